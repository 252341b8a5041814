//! A queue worker: enqueues one job, then fetches jobs with a lease, does the work and
//! acks each one; a job that fails is requeued to be tried again a minute later, and
//! after `max_attempts` deliveries it lands in the dead-letter queue `emails.dlq`.
//!
//! ```sh
//! cargo run -p herald-client --example queue_worker
//! ```
//!
//! The server is `HERALD_URL` (default `http://127.0.0.1:7070`). Ctrl-C stops it.

use std::time::Duration;

use herald_client::{Client, ClientError, FetchOptions};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::var("HERALD_URL").unwrap_or_else(|_| "http://127.0.0.1:7070".to_owned());
    let client = Client::new(url);
    client.enqueue("emails", "application/json", r#"{"email":"a@example.com"}"#, Duration::ZERO).await?;

    // Up to 10 jobs at a time, each leased for 60 s; wait up to 20 s for one (a long
    // poll: an enqueue answers it at once).
    let options = FetchOptions { max: 10, visibility: Duration::from_secs(60), wait: Duration::from_secs(20) };
    loop {
        for job in client.fetch_jobs("emails", options).await? {
            match send_email(&job.payload.to_line()).await {
                Ok(()) => client.ack("emails", &job).await?,
                // Try again in a minute; after max_attempts deliveries it lands in emails.dlq.
                Err(_) => client.requeue("emails", &job, Duration::from_secs(60)).await?,
            }
        }
    }
}

/// The work. A job that takes longer than its lease should call
/// `client.extend("emails", &job, Duration::from_secs(60))` from time to time.
async fn send_email(job: &str) -> Result<(), ()> {
    println!("sending {job}");
    Ok(())
}
