//! A systemd notify socket (`NOTIFY_SOCKET`): a Unix datagram socket that collects the
//! `sd_notify` messages the agent sends, in order.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct NotifySocket {
    pub path: PathBuf,
    messages: Arc<Mutex<Vec<(tokio::time::Instant, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path).expect("bind notify socket");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf).await {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock().unwrap().push((tokio::time::Instant::now(), text));
            }
        });
        NotifySocket { path, messages, task }
    }

    /// Every datagram so far, each split into its `KEY=VALUE` lines.
    pub fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().iter().map(|(_, m)| m.clone()).collect()
    }

    /// All `KEY=VALUE` lines in arrival order.
    pub fn lines(&self) -> Vec<String> {
        self.messages()
            .iter()
            .flat_map(|m| m.lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    /// When the first line equal to `line` arrived.
    pub fn arrival(&self, line: &str) -> Option<tokio::time::Instant> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .find(|(_, m)| m.lines().any(|l| l == line))
            .map(|(t, _)| *t)
    }

    /// Waits until `count` lines equal to `line` arrived.
    pub async fn wait_for(&self, line: &str, count: usize, within: Duration) {
        super::eventually(within, &format!("{count}x {line} on NOTIFY_SOCKET"), || async {
            (self.lines().iter().filter(|l| *l == line).count() >= count).then_some(())
        })
        .await
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.task.abort();
    }
}
