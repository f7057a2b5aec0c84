//! A TCP endpoint on loopback that accepts connections and never answers (a hung process, a
//! load balancer without a healthy backend), until it is told to forward new connections to a
//! real server.
use std::{
    io,
    net::{Shutdown, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

/// The stalling endpoint; its thread and held connections end on drop.
#[derive(Debug)]
pub struct Stall {
    port: u16,
    state: Arc<State>,
    accept: Option<thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct State {
    /// Where new connections go; `None`: they are held and never answered.
    target: Mutex<Option<u16>>,
    /// Connections accepted while silent (kept open, never read).
    held: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

impl Stall {
    /// Listens on a free loopback port, silent.
    pub fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State::default());
        let st = state.clone();
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let target = *st.target.lock().unwrap_or_else(|e| e.into_inner());
                match target {
                    None => st.held.lock().unwrap_or_else(|e| e.into_inner()).push(conn),
                    Some(to) => {
                        let _ = forward(conn, to);
                    }
                }
            }
        });
        Ok(Self {
            port,
            state,
            accept: Some(accept),
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:<port>` (the TLS is the forwarded server's).
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// From now on, new connections are forwarded to `127.0.0.1:port`; the
    /// held ones are closed.
    pub fn forward_to(&self, port: u16) {
        *self.state.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(port);
        for c in self
            .state
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Connections accepted and held so far.
    pub fn held(&self) -> usize {
        self.state
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Copies both ways between `conn` and `127.0.0.1:to` on two threads.
fn forward(conn: TcpStream, to: u16) -> io::Result<()> {
    let upstream = TcpStream::connect(("127.0.0.1", to))?;
    let (mut a_read, mut a_write) = (conn.try_clone()?, conn);
    let (mut b_read, mut b_write) = (upstream.try_clone()?, upstream);
    thread::spawn(move || {
        let _ = io::copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    thread::spawn(move || {
        let _ = io::copy(&mut b_read, &mut a_write);
        let _ = a_write.shutdown(Shutdown::Write);
    });
    Ok(())
}

impl Drop for Stall {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.state
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}
