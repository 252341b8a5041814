//! A resuming subscriber: prints every message of a topic, one a line, and saves its
//! position (the topic's epoch and the next offset) in a file after each one, so that
//! when it is started again it goes on where it stopped: nothing missed, nothing twice.
//! Within one run, [`Client::subscribe`] already reconnects and resumes by itself.
//!
//! ```sh
//! cargo run -p herald-client --example subscribe -- news news.position
//! ```
//!
//! The server is `HERALD_URL` (default `http://127.0.0.1:7070`). Ctrl-C stops it.

use herald_client::{Client, Event, StartFrom};

type Error = Box<dyn std::error::Error>;

/// Where a subscription stands: the history it reads and the next offset it wants.
struct Position {
    epoch: String,
    next: u64,
}

impl Position {
    /// The saved position, if there is one (`<epoch> <next>`).
    fn load(path: &str) -> Result<Option<Self>, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let (epoch, next) = text.trim().split_once(' ').ok_or("a position file holds `<epoch> <next>`")?;
        Ok(Some(Position { epoch: epoch.to_owned(), next: next.parse()? }))
    }

    /// Written to a temporary file, then renamed over the old one, so that a crash
    /// mid-write leaves the previous position rather than half of one.
    fn save(&self, path: &str) -> Result<(), Error> {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, format!("{} {}\n", self.epoch, self.next))?;
        std::fs::rename(tmp, path)?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let url = std::env::var("HERALD_URL").unwrap_or_else(|_| "http://127.0.0.1:7070".to_owned());
    let mut args = std::env::args().skip(1);
    let topic = args.next().unwrap_or_else(|| "news".to_owned());
    let path = args.next().unwrap_or_else(|| format!("{topic}.position"));
    let client = Client::new(url);

    let mut subscription = match Position::load(&path)? {
        // The epoch lets the server tell whether offset `next` is still the message we
        // expect: not if the topic was deleted and published again meanwhile.
        Some(Position { epoch, next }) => client.resume(&topic, next, epoch),
        None => client.subscribe(&topic, StartFrom::Earliest),
    };
    let mut epoch = String::new();
    while let Some(event) = subscription.next().await {
        match event {
            Event::Subscribed { epoch: current, recovered, next } => {
                if !recovered {
                    // Deleted or trimmed past our position: what we missed is gone.
                    eprintln!("could not resume without loss; continuing from offset {next}");
                }
                epoch = current;
            }
            Event::Message(m) => {
                println!("{}: {}", m.offset, m.payload.to_line());
                Position { epoch: epoch.clone(), next: m.offset + 1 }.save(&path)?;
            }
            Event::Disconnected(why) => eprintln!("disconnected ({why}); reconnecting"),
        }
    }
    // `next` gives `None` only if the subscription's task ended.
    Err("the subscription ended".into())
}
