//! The control socket's request decoder on arbitrary lines, as the daemon runs it on every
//! line a client sends: no panic, no hang; a line it cannot serve gets one JSON error reply
//! (`{"version":1,"ok":false,"error":"..."}` and a newline), and a request it accepts says the
//! same thing once encoded and decoded again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portguard::protocol::{PROTOCOL_VERSION, Response, decode_request};

fuzz_target!(|line: &[u8]| {
    match decode_request(line) {
        Ok(request) => {
            assert_eq!(request.version, PROTOCOL_VERSION);
            let again = serde_json::to_vec(&request).expect("a request encodes");
            assert_eq!(decode_request(&again), Ok(request));
        }
        Err(message) => {
            assert!(!message.is_empty());
            let reply = Response::error(message.clone()).to_line();
            assert!(
                reply.ends_with('\n') && reply.matches('\n').count() == 1,
                "a reply is one line: {reply:?}"
            );
            let parsed: serde_json::Value =
                serde_json::from_str(reply.trim_end()).expect("the reply is JSON");
            assert_eq!(parsed["version"], PROTOCOL_VERSION);
            assert_eq!(parsed["ok"], false);
            assert_eq!(parsed["error"], message.as_str());
        }
    }
});
