//! `Config::parse` on arbitrary UTF-8: a configuration or an error naming the file, never a panic.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sealgate::config::Config;

fuzz_target!(|text: &str| {
    let path = Path::new("/srv/sealgate/proxy.toml");
    match Config::parse(text, path) {
        Err(error) => {
            assert_eq!(error.path, path);
            assert!(!error.message.is_empty());
            if let Some((line, column)) = error.position {
                assert!(line >= 1 && column >= 1);
                assert!(line <= text.lines().count().max(1) + 1);
            }
            let _ = error.to_string();
        }
        Ok(config) => {
            assert!(!config.listeners.is_empty());
            assert!(!config.custody.grantee.trim().is_empty());
            if let Some(hsts) = &config.hsts {
                let _ = hsts.header_value();
            }
            let _ = format!("{config:?}");
        }
    }
});
