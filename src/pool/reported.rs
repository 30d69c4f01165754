//! The server parameters clients are told at login (ParameterStatus), encoded once per
//! pool.

use crate::server::params::Settings;

/// The parameters a server reported at startup, and their ParameterStatus messages
/// encoded once: a login copies them instead of encoding a dozen messages again.
pub struct ReportedParams {
    pub list: Vec<(String, String)>,
    encoded: bytes::Bytes,
    /// Where each entry's message sits in `encoded`.
    ends: Vec<usize>,
}

impl ReportedParams {
    pub fn new(mut list: Vec<(String, String)>) -> ReportedParams {
        list.sort();
        let mut buf = bytes::BytesMut::new();
        let mut ends = Vec::with_capacity(list.len());
        for (k, v) in &list {
            crate::protocol::messages::parameter_status(&mut buf, k, v);
            ends.push(buf.len());
        }
        ReportedParams {
            list,
            encoded: buf.freeze(),
            ends,
        }
    }

    /// Appends the ParameterStatus messages a client is told at login, with the values
    /// its own settings override.
    pub fn write(&self, out: &mut bytes::BytesMut, settings: &Settings) {
        let mut from = 0;
        // One pass in list order, no allocation per login; most clients override one
        // entry (application_name) or none.
        if !settings.is_empty() {
            for (i, (name, value)) in self.list.iter().enumerate() {
                let Some(v) = settings.get(name).filter(|v| *v != value) else {
                    continue;
                };
                let start = if i == 0 { 0 } else { self.ends[i - 1] };
                out.extend_from_slice(&self.encoded[from..start]);
                crate::protocol::messages::parameter_status(out, name, v);
                from = self.ends[i];
            }
        }
        out.extend_from_slice(&self.encoded[from..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_parameters_match_encoding_each_message() {
        let list = vec![
            ("server_version".to_string(), "15.0".to_string()),
            ("application_name".to_string(), "".to_string()),
            ("TimeZone".to_string(), "UTC".to_string()),
            ("DateStyle".to_string(), "ISO, MDY".to_string()),
        ];
        check(list.clone());
        // A long list (some servers report many parameters) is handled the same way.
        let mut long = list;
        long.extend((0..70).map(|i| (format!("x{i:02}"), "v".to_string())));
        check(long);
    }

    fn check(list: Vec<(String, String)>) {
        let rp = ReportedParams::new(list.clone());
        for settings in [
            Settings::default(),
            Settings::from_iter([("application_name".to_string(), "app".to_string())]),
            Settings::from_iter([
                ("DateStyle".to_string(), "ISO, DMY".to_string()),
                ("TimeZone".to_string(), "UTC".to_string()),
                ("search_path".to_string(), "x".to_string()),
                ("server_version".to_string(), "1".to_string()),
                ("x69".to_string(), "w".to_string()),
                ("x01".to_string(), "w".to_string()),
            ]),
        ] {
            let mut sorted = list.clone();
            sorted.sort();
            let mut want = bytes::BytesMut::new();
            for (k, v) in &sorted {
                let v = settings.get(k).unwrap_or(v);
                crate::protocol::messages::parameter_status(&mut want, k, v);
            }
            let mut got = bytes::BytesMut::new();
            rp.write(&mut got, &settings);
            assert_eq!(got, want, "settings {settings:?}");
        }
    }
}
