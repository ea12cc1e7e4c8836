//! The node's embedded SSH server: one russh session per tunnelled client stream,
//! authenticated by the order's public keys only. Everything not explicitly
//! allowed here (password, keyboard-interactive, agent, X11, port forwarding,
//! other subsystems, other environment variables) is refused.

pub mod channel;
pub mod input;
pub mod pty;

use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::sandbox::process::env_allowed;
use channel::ChannelCtx;
use input::Backlog;

/// Server settings shared by all connections.
pub fn config(host_key: PrivateKey) -> Arc<russh::server::Config> {
    Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(
            format!("SSH-2.0-jusy_{}", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // A failed key costs the client a second, as in sshd; the initial "none"
        // probe every OpenSSH client sends is answered at once.
        auth_rejection_time: Duration::from_secs(1),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        // Idle shells are legitimate; the session's own limits end sessions.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 4,
        max_auth_attempts: 6,
        // The first window; later ones are the connection's `Backlog::window`.
        window_size: input::WINDOW,
        ..Default::default()
    })
}

/// Who may log in to one order, and as whom.
#[derive(Debug)]
pub struct Access {
    pub ctx: Arc<ChannelCtx>,
    pub keys: Vec<PublicKey>,
}

impl Access {
    fn allows(&self, user: &str, key: &PublicKey) -> bool {
        user == self.ctx.sandbox.user.name
            && self.keys.iter().any(|k| k.key_data() == key.key_data())
    }
}

/// Serves one client connection until it closes.
pub async fn serve<S>(
    config: Arc<russh::server::Config>,
    stream: S,
    access: Arc<Access>,
) -> Result<(), russh::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = ConnHandler {
        access,
        backlog: Arc::default(),
        channels: JoinSet::new(),
    };
    let session = russh::server::run_stream(config, stream, handler).await?;
    session.await
}

/// Per-connection handler; dropping it (connection closed or session ended)
/// aborts its channel tasks.
struct ConnHandler {
    access: Arc<Access>,
    /// Client input its channels have queued; it sets the client's window.
    backlog: Arc<Backlog>,
    channels: JoinSet<()>,
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.access.allows(user, offer.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(if self.access.allows(user, key.public_key) {
            Auth::Accept
        } else {
            Auth::reject()
        })
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        self.channels.spawn(channel::run(
            channel,
            self.access.ctx.clone(),
            self.backlog.clone(),
            session.handle(),
        ));
        Ok(())
    }

    /// russh asks this each time it has refilled a channel's receive window,
    /// for the size of the next refill (on any channel of the connection).
    fn adjust_window(&mut self, _channel: ChannelId, _current: u32) -> u32 {
        self.backlog.window()
    }

    /// The data itself reaches the channel's task; this only paces a client
    /// that is held to a trickle of window (see `input`). A timer, never a
    /// wait on the client: the connection must keep being read.
    async fn data(
        &mut self,
        _channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(pause) = self.backlog.pause(data.len()) {
            tokio::time::sleep(pause).await;
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _cols: u32,
        _rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if env_allowed(name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }
}
