//! The accept loop: a task per connection served by hyper-util's HTTP/1 + HTTP/2 builder, as
//! `axum::serve` does (and with its graceful shutdown), except that each connection's future runs
//! inside [`Repoll`].

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use axum::Router;
use futures::task::AtomicWaker;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves `router` on `listener` until `stop` turns true; then stops accepting, lets every open
/// connection finish its request in flight (idle keep-alive connections close) and returns when
/// all are closed.
/// A connection's request headers must arrive within `header_timeout` (else it is closed).
pub async fn run(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Each connection task holds a receiver; `closed()` resolves when the last one is gone.
    let (all_closed, open) = watch::channel(());
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = tcp.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let mut conn_stop = stop.clone();
        let open = open.clone();
        tokio::spawn(Repoll::new(async move {
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let mut conn = pin!(builder.serve_connection_with_upgrades(TokioIo::new(tcp), service));
            let mut stopping = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::trace!("connection ended with an error: {e}");
                        }
                        break;
                    }
                    () = stopped(&mut conn_stop), if !stopping => {
                        stopping = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(open);
        }));
    }
    drop(listener);
    drop(open);
    all_closed.closed().await;
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// A failed `accept`: a connection that went away before it was accepted is no matter; anything
/// else (e.g. out of file descriptors) is logged and retried after a second.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// How many times in a row [`Repoll`] re-polls before it yields to the runtime after all.
const MAX_REPOLLS: usize = 4;

/// Runs a future so that a wake-up it gives itself while being polled re-polls it at once,
/// instead of rescheduling its task. Hyper's request-body channel does that on every request with
/// a body: the handler taking the body wakes the connection's own task (the body's sender), and
/// tokio reschedules a task woken while it runs by queueing it and waking an idle worker thread,
/// a futex call and a cross-CPU wake-up between reading the request and sending it upstream.
/// Wake-ups from elsewhere (I/O, timers, other tasks) wake the task as usual.
pub struct Repoll<F> {
    inner: Pin<Box<F>>,
    state: Arc<RepollState>,
    waker: Waker,
}

struct RepollState {
    /// The inner future is being polled right now.
    polling: AtomicBool,
    /// It was woken since its current poll began.
    woken: AtomicBool,
    /// The task running the [`Repoll`].
    task: AtomicWaker,
}

impl<F: Future> Repoll<F> {
    pub fn new(inner: F) -> Repoll<F> {
        let state = Arc::new(RepollState {
            polling: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            task: AtomicWaker::new(),
        });
        Repoll {
            inner: Box::pin(inner),
            waker: Waker::from(state.clone()),
            state,
        }
    }
}

impl Wake for RepollState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Flag first, then look: a poll that ends after this sees the flag and polls again; one
        // that had already ended is not polling, so the task is woken.
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.task.wake();
        }
    }
}

impl<F: Future> Future for Repoll<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.state.task.register(cx.waker());
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..MAX_REPOLLS {
            this.state.woken.store(false, SeqCst);
            this.state.polling.store(true, SeqCst);
            let r = this.inner.as_mut().poll(&mut inner_cx);
            this.state.polling.store(false, SeqCst);
            if r.is_ready() {
                return r;
            }
            if !this.state.woken.load(SeqCst) {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the polls of a future that wakes itself during its first `self_wakes` polls.
    struct SelfWaking {
        polls: Arc<AtomicUsize>,
        self_wakes: usize,
    }

    impl Future for SelfWaking {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            let n = self.polls.fetch_add(1, SeqCst);
            if n < self.self_wakes {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    /// Polls a `Repoll` of a future that wakes itself `self_wakes` times, once, from a task whose
    /// wake-ups are counted; returns (task wake-ups, inner polls, the future).
    fn poll_once(self_wakes: usize) -> (Arc<CountWakes>, Arc<AtomicUsize>, Repoll<SelfWaking>) {
        let outer = Arc::new(CountWakes(AtomicUsize::new(0)));
        let waker = Waker::from(outer.clone());
        let mut cx = Context::from_waker(&waker);
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = Repoll::new(SelfWaking {
            polls: polls.clone(),
            self_wakes,
        });
        assert!(Pin::new(&mut f).poll(&mut cx).is_pending());
        (outer, polls, f)
    }

    #[test]
    fn a_self_wake_is_a_repoll_not_a_task_wake() {
        let (outer, polls, f) = poll_once(1);
        assert_eq!(polls.load(SeqCst), 2, "polled again at once");
        assert_eq!(outer.0.load(SeqCst), 0, "the task was not woken");
        // A wake-up from outside, between polls, wakes the task.
        f.waker.wake_by_ref();
        assert_eq!(outer.0.load(SeqCst), 1);
    }

    #[test]
    fn endless_self_wakes_yield_to_the_runtime() {
        let (outer, polls, _f) = poll_once(usize::MAX);
        assert_eq!(polls.load(SeqCst), MAX_REPOLLS);
        assert_eq!(
            outer.0.load(SeqCst),
            1,
            "then it is rescheduled like any task"
        );
    }
}
