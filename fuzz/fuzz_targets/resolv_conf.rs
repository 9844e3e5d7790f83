//! The pod's resolv.conf as the client reads it (it comes from server-cluster,
//! through the greeting): never a panic, and what it keeps reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teletun::proto::resolv_conf::parse;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let conf = parse(&text);
    assert_eq!(parse(&conf.to_text()), conf, "to_text does not read back");
    for domain in &conf.search {
        assert!(!domain.is_empty() && !domain.ends_with('.'));
    }
});
