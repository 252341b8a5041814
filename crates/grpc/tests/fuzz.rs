//! Fuzz harness (proptest, stable Rust) for gRPC request messages, which every client
//! controls: any bytes decode into each request type or are refused by prost, never a
//! panic. (The values that decode are then checked by the services like any other:
//! names, kinds, limits; crates/server/tests/grpc.rs.)

use herald_grpc::pb;
use proptest::prelude::*;
use prost::Message;

fn decode_all(bytes: &[u8]) {
    let _ = pb::PublishRequest::decode(bytes);
    let _ = pb::PublishBatchRequest::decode(bytes);
    let _ = pb::SubscribeRequest::decode(bytes);
    let _ = pb::FetchRequest::decode(bytes);
    let _ = pb::EnqueueRequest::decode(bytes);
    let _ = pb::QueueFetchRequest::decode(bytes);
    let _ = pb::AckRequest::decode(bytes);
    let _ = pb::ExtendRequest::decode(bytes);
}

#[test]
fn the_seed_corpus_decodes_or_is_refused() {
    // A length prefix far past the buffer, a deep group, an unknown wire type.
    for seed in [&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..], &[0x0b; 64][..], &[0x0f, 0x00][..], &[][..]] {
        decode_all(seed);
    }
}

proptest! {
    #[test]
    fn any_bytes_decode_or_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }
}
