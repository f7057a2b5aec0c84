//! `podmesh-wireguard`: userspace WireGuard for nodes whose kernel has none.
//!
//! It creates a TUN device, moves its packets with podmesh's own loop around
//! gotatun's WireGuard sessions (gotatun is a maintained boringtun fork; its
//! own device stays selectable with `--packet-loop gotatun`, see
//! [`packet_loop`]) and serves the standard WireGuard configuration protocol (UAPI) on
//! `<run-dir>/<interface>.sock`, the socket `wg(8)` and wireguard-go use. It
//! holds no configuration of its own: podmesh-agent sets the key, the port
//! and the peers through the socket, and so can `wg`.
//!
//! It is a process of its own, in a session of its own, so that the agent
//! can be killed, restarted or upgraded while encrypted traffic keeps
//! flowing: the agent adopts the running process through the socket and only
//! changes what differs. (Cilium removed its in-agent userspace WireGuard
//! because an agent restart cut every connection.) In a DaemonSet it is a
//! container of its own. It stops on SIGTERM or SIGINT; the TUN device goes
//! with it.
use std::{
    io::ErrorKind,
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::ExitCode,
};

mod defer;
mod packet_loop;
mod tun;
mod udp;

use anyhow::Context;
use clap::Parser;
use gotatun::{
    device::{DeviceBuilder, uapi::UapiServer},
    udp::{
        UdpTransportFactory, UdpTransportFactoryParams,
        socket::{UdpSocket, UdpSocketFactory},
    },
};
use nix::sys::socket::{setsockopt, sockopt};
use packet_loop::socket::SOCKET_BUFFER;
use udp::GsoSocket;

/// Userspace WireGuard on a TUN device, configured through the WireGuard UAPI socket.
#[derive(Debug, Parser)]
#[command(name = "podmesh-wireguard", version, about, long_about = None)]
struct Args {
    /// Name of the TUN device to create (podmesh-agent expects podmesh-wg).
    #[arg(long, default_value = "podmesh-wg")]
    interface: String,
    /// Directory of the UAPI socket `<interface>.sock` and the pid file `<interface>.pid` (the directory `wg` looks in is /var/run/wireguard).
    #[arg(long, value_name = "DIR", default_value = "/var/run/wireguard")]
    run_dir: PathBuf,
    /// Threads of the packet path: with `--packet-loop own`, 2 is one per direction and 1 one
    /// for both; with gotatun, the runtime's workers.
    #[arg(long, env = "PODMESH_WIREGUARD_THREADS", default_value_t = 2)]
    threads: usize,
    /// What moves the packets: `own`, podmesh's loop around gotatun's WireGuard sessions
    /// (batches from TUN offloads and UDP GSO/GRO, no task switches per packet), or `gotatun`,
    /// gotatun's own device.
    #[arg(long, value_enum, env = "PODMESH_WIREGUARD_PACKET_LOOP", default_value_t = PacketLoop::Own)]
    packet_loop: PacketLoop,
    /// Where the kernel has WireGuard, create nothing and wait for SIGTERM, so that
    /// podmesh-agent's `--wireguard-backend auto` takes the kernel's device (a DaemonSet
    /// container that runs on every node, whatever its kernel).
    #[arg(long)]
    defer_to_kernel_wireguard: bool,
}

/// See [`Args::packet_loop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PacketLoop {
    Own,
    Gotatun,
}

/// gotatun's UDP sockets, bound again when the port is still held by the
/// connection a reconfiguration (a new private key) just stopped: gotatun
/// aborts the old connection's tasks and binds the same port at once, while
/// the runtime has not dropped the old socket yet (EADDRINUSE, and the device
/// would stay without a socket). Retried for up to a second. The socket's
/// buffers are raised to [`SOCKET_BUFFER`] and batches are sent with UDP GSO
/// ([`GsoSocket`]).
#[derive(Debug, Default)]
struct Rebinding(UdpSocketFactory);

impl UdpTransportFactory for Rebinding {
    type Send = GsoSocket;
    type Recv = UdpSocket;

    async fn bind(
        &mut self,
        params: &UdpTransportFactoryParams,
    ) -> std::io::Result<(GsoSocket, UdpSocket)> {
        let mut tries = 0;
        loop {
            match self.0.bind(params).await {
                Err(e) if e.kind() == ErrorKind::AddrInUse && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                r => {
                    let (send, recv) = r?;
                    // Past net.core.rmem_max/wmem_max (we hold CAP_NET_ADMIN):
                    // a burst the receiver cannot take at once waits here
                    // instead of being dropped and retransmitted by TCP.
                    let _ = setsockopt(&recv, sockopt::RcvBufForce, &SOCKET_BUFFER);
                    let _ = setsockopt(&send, sockopt::SndBufForce, &SOCKET_BUFFER);
                    return Ok((GsoSocket::new(send), recv));
                }
            }
        }
    }
}

/// Exit status when another process already serves the socket.
const EXIT_ALREADY_SERVED: u8 = 3;

/// Returns when the device is gone. gotatun reports a "fatal" error also when
/// a reconfiguration (a new private key or port) replaces its connection and
/// the old connection's tasks see their channels close, while the new
/// connection carries on: so an error ends this process only when the TUN
/// device is gone too.
async fn watch_device<T: gotatun::device::DeviceTransports>(
    device: &mut gotatun::device::Device<T>,
    interface: &str,
) -> anyhow::Result<()> {
    device.wait().await;
    tracing::info!(
        "the WireGuard device reported an error (also seen when it is reconfigured); carrying on while {interface} exists"
    );
    loop {
        if nix::net::if_::if_nametoindex(interface).is_err() {
            anyhow::bail!("{interface} is gone");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// What serves the TUN device.
enum Served {
    Own(packet_loop::Running),
    Gotatun(
        gotatun::device::Device<(Rebinding, tun::TunSend, tun::TunRecv)>,
        gotatun::device::uapi::UapiClient,
    ),
}

impl Served {
    /// Returns when the device is gone.
    async fn watch(&mut self, interface: &str) -> anyhow::Result<()> {
        match self {
            Served::Own(running) => match running.stopped.recv().await {
                Some(why) => anyhow::bail!("{why}"),
                None => std::future::pending().await,
            },
            Served::Gotatun(device, _) => watch_device(device, interface).await,
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // A session of its own: a signal to the starter's process group or
    // session (a terminal's Ctrl-C, a supervisor's group kill) is not ours.
    // Already a session leader (started as one) is fine.
    let _ = nix::unistd::setsid();
    let sock = args.run_dir.join(format!("{}.sock", args.interface));
    if UnixStream::connect(&sock).is_ok() {
        eprintln!(
            "podmesh-wireguard: {} is already served by a running process; not starting a second one",
            sock.display()
        );
        return ExitCode::from(EXIT_ALREADY_SERVED);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("podmesh-wireguard: cannot start the runtime: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run(&args, &sock)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podmesh-wireguard: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(args: &Args, sock: &Path) -> anyhow::Result<()> {
    if args.defer_to_kernel_wireguard {
        match defer::kernel_has_wireguard() {
            Ok(()) => return defer::stand_by(&args.interface).await,
            Err(why) => {
                tracing::info!(reason = %why, "no kernel WireGuard; serving it in userspace")
            }
        }
    }
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("creating {}", args.run_dir.display()))?;
    let tun_context = || {
        format!(
            "creating TUN device {} (needs CAP_NET_ADMIN and /dev/net/tun)",
            args.interface
        )
    };
    let mut served = match args.packet_loop {
        PacketLoop::Own => Served::Own(
            packet_loop::start(&args.interface, args.threads).with_context(tun_context)?,
        ),
        PacketLoop::Gotatun => {
            let (client, server) = UapiServer::new();
            let (tx, rx) = tun::create(&args.interface).with_context(tun_context)?;
            let device = DeviceBuilder::new()
                .with_udp(Rebinding(UdpSocketFactory {
                    recv_buffer_size: Some(SOCKET_BUFFER),
                    send_buffer_size: Some(SOCKET_BUFFER),
                }))
                .with_ip_pair(tx, rx)
                .with_uapi(server)
                .build()
                .await
                .context("starting the WireGuard device")?;
            Served::Gotatun(device, client)
        }
    };
    match std::fs::remove_file(sock) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale {}", sock.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(sock).with_context(|| format!("binding {}", sock.display()))?;
    let pid_file = args.run_dir.join(format!("{}.pid", args.interface));
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    // One thread per UAPI connection (the agent holds one at a time).
    let uapi: Box<dyn Fn(UnixStream) + Send> = match &served {
        Served::Own(running) => {
            let device = std::sync::Arc::clone(&running.device);
            Box::new(move |s| {
                let device = std::sync::Arc::clone(&device);
                std::thread::spawn(move || packet_loop::uapi::serve(&device, s));
            })
        }
        Served::Gotatun(_, client) => {
            let client = client.clone();
            Box::new(move |s| client.clone().wrap_read_write(s))
        }
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => uapi(s),
                Err(e) => tracing::warn!(error = %e, "accepting a UAPI connection failed"),
            }
        }
    });
    tracing::info!(
        interface = %args.interface,
        socket = %sock.display(),
        packet_loop = ?args.packet_loop,
        "serving WireGuard; configure it through the UAPI socket"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        r = served.watch(&args.interface) => r,
    };
    // Only our own files: a successor may already have replaced them.
    if std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == std::process::id().to_string())
    {
        let _ = std::fs::remove_file(&pid_file);
        let _ = std::fs::remove_file(sock);
    }
    if let Served::Gotatun(device, _) = served {
        device.stop().await;
    }
    tracing::info!("stopped; the TUN device goes with this process");
    result
}
