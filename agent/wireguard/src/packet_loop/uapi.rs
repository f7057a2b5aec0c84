//! The WireGuard configuration protocol (UAPI) on the packet loop's device:
//! requests end with an empty line, `get=1` is answered with the device and
//! `errno=0`, `set=1` with `errno=N`, each followed by an empty line
//! (<https://www.wireguard.com/xplatform/#configuration-protocol>). Requests
//! are parsed with gotatun's command types.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    str::FromStr,
};

use gotatun::device::uapi::command::Request;

use super::device::Device;

/// Serves one connection until the client closes it.
pub fn serve(dev: &Device, stream: UnixStream) {
    let mut request = String::new();
    let mut writer = &stream;
    for line in BufReader::new(&stream).lines() {
        let Ok(line) = line else {
            break;
        };
        if !line.is_empty() {
            request.push_str(&line);
            request.push('\n');
            continue;
        }
        if request.is_empty() {
            continue;
        }
        let reply = answer(dev, &request);
        request.clear();
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
    // A request ended by closing the connection instead of an empty line.
    if !request.is_empty() {
        let _ = writer.write_all(answer(dev, &request).as_bytes());
    }
}

/// The answer to one request (without its empty line), empty line included.
pub fn answer(dev: &Device, request: &str) -> String {
    match Request::from_str(request) {
        Ok(Request::Get(_)) => format!("{}\n", dev.get()),
        Ok(Request::Set(set)) => format!("errno={}\n\n", dev.set(set)),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "refused a UAPI request");
            format!("errno={}\n\n", libc::EINVAL)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_with_errno_and_an_empty_line() {
        let d = Device::new(1420);
        assert_eq!(answer(&d, "get=1\n"), "listen_port=0\nerrno=0\n\n");
        assert_eq!(answer(&d, "set=1\nbogus=1\n"), "errno=22\n\n");
        assert_eq!(answer(&d, "hello\n"), "errno=22\n\n");
        assert_eq!(answer(&d, "set=1\nfwmark=3\n"), "errno=0\n\n");
        assert!(answer(&d, "get=1\n").contains("fwmark=3\n"));
    }

    #[test]
    fn a_connection_carries_several_requests() {
        let d = Device::new(1420);
        let (a, b) = UnixStream::pair().unwrap();
        let server = std::thread::scope(|s| {
            let h = s.spawn(|| serve(&d, b));
            let mut w = &a;
            w.write_all(b"set=1\nlisten_port=0\n\nget=1\n\n").unwrap();
            a.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = String::new();
            std::io::Read::read_to_string(&mut &a, &mut out).unwrap();
            h.join().unwrap();
            out
        });
        assert!(server.starts_with("errno=0\n\nlisten_port="), "{server}");
        assert!(server.ends_with("errno=0\n\n"), "{server}");
    }
}
