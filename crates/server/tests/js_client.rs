//! The JavaScript client's own tests (`clients/js/test/`, `node --test`) against the
//! binary under test: publish and subscribe, resume across a server restart with no loss
//! or duplicate, presence, queues, typed errors, auth. Needs node and npm; see
//! `common::node` for what happens without them.

mod common;

#[test]
fn the_javascript_client_passes_its_tests() -> common::Result {
    common::node::run("clients/js", "ws", "the JavaScript client's tests", false)
}
