//! A publisher: sends a text, a JSON and a binary message to a topic over HTTP and
//! prints the offset each one got.
//!
//! ```sh
//! cargo run -p herald-client --example publish -- news
//! ```
//!
//! The server is `HERALD_URL` (default `http://127.0.0.1:7070`).

use herald_client::{Client, ClientError};

#[tokio::main]
async fn main() -> Result<(), ClientError> {
    let url = std::env::var("HERALD_URL").unwrap_or_else(|_| "http://127.0.0.1:7070".to_owned());
    let topic = std::env::args().nth(1).unwrap_or_else(|| "news".to_owned());
    let client = Client::new(url);

    // The content type decides the kind: text/* is text, application/json is JSON
    // (it must parse), anything else is binary.
    let text = client.publish_text(&topic, "hello").await?;
    let json = client.publish(&topic, "application/json", r#"{"price": 12.50}"#).await?;
    let binary = client.publish(&topic, "application/octet-stream", vec![0u8, 1, 2]).await?;
    println!("published at offsets {}, {} and {}", text.offset, json.offset, binary.offset);
    Ok(())
}
