//! The HTTP/1 header read timeout (`server.header_read_timeout_ms`, slow loris): once a
//! connection waits for a request head, the head must be complete within the timeout, or the
//! connection is closed. [`FramingGuard`](crate::framing::FramingGuard) runs it below hyper,
//! where it sees when each head starts being awaited and when it is complete.
//!
//! Why not hyper's own `header_read_timeout`: hyper drops its timer after every head and makes
//! a new one for the next (an allocation, a timer-wheel insertion and removal, a clock read and
//! an extra pass of its dispatch loop per request), which on a cache hit cost about as much as
//! everything permgate itself does. Here one timer per connection is armed lazily: a head
//! awaited costs one clock read, and the timer moves only when it fires before the deadline of
//! the head now awaited (at most once per timeout period), not once per request.

use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// One connection's header read deadline. See the module documentation.
#[derive(Debug)]
pub struct HeadTimer {
    limit: Duration,
    /// The number of the head awaited (heads completed before it) and when it must be complete.
    awaited: Option<(u64, Instant)>,
    /// Fires at or before the deadline of the head awaited; created on the first wait.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl HeadTimer {
    pub fn new(limit: Duration) -> HeadTimer {
        HeadTimer {
            limit,
            awaited: None,
            sleep: None,
        }
    }

    /// Called while the connection waits for head number `head` (the count of heads completed
    /// before it): ready once that head has been awaited for the whole limit. The wait starts
    /// at the first call for a new `head`.
    pub fn poll_expired(&mut self, head: u64, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.await_head(head);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            // Outside tokio's cooperative budget: a poll the budget refused would register no
            // waker (tokio makes a sleep's timer on its first admitted poll) while the sleep
            // reads as not elapsed, and `start` would then trust a timer that never fires.
            ready!(pin!(tokio::task::unconstrained(sleep.as_mut())).poll(cx));
            // Armed for an earlier head: move it to this one's deadline, and wait again.
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }

    /// Starts the wait for head number `head` where nothing reads yet (hyper reads once woken):
    /// like [`HeadTimer::poll_expired`], but the timer is polled only when it would not wake
    /// the task by the deadline anyway (not made yet, or already fired). Armed for an earlier
    /// deadline, it wakes the task then, and the reader's poll moves it on.
    pub fn start(&mut self, head: u64, cx: &mut Context<'_>) -> Poll<()> {
        self.await_head(head);
        match &self.sleep {
            Some(sleep) if !sleep.is_elapsed() => Poll::Pending,
            _ => self.poll_expired(head, cx),
        }
    }

    /// The deadline of head number `head`, set at the first call for it.
    fn await_head(&mut self, head: u64) -> Instant {
        match self.awaited {
            Some((awaited, deadline)) if awaited == head => deadline,
            _ => {
                let deadline = Instant::now() + self.limit;
                self.awaited = Some((head, deadline));
                deadline
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::task::Waker;

    use super::*;

    const LIMIT: Duration = Duration::from_millis(150);

    /// Polls the wait for `head` once, without blocking.
    async fn expired(timer: &mut HeadTimer, head: u64) -> bool {
        poll_fn(|cx| Poll::Ready(timer.poll_expired(head, cx).is_ready())).await
    }

    /// Waits for `head` until it expires; how long that took.
    async fn wait(timer: &mut HeadTimer, head: u64) -> Duration {
        let started = Instant::now();
        poll_fn(|cx| timer.poll_expired(head, cx)).await;
        started.elapsed()
    }

    #[tokio::test]
    async fn a_head_awaited_for_the_limit_expires() {
        let mut timer = HeadTimer::new(LIMIT);
        let waited = wait(&mut timer, 0).await;
        assert!(waited >= LIMIT, "{waited:?}");
        assert!(expired(&mut timer, 0).await, "stays expired");
    }

    #[tokio::test]
    async fn each_head_gets_the_whole_limit_from_when_it_is_first_awaited() {
        let mut timer = HeadTimer::new(LIMIT);
        assert!(!expired(&mut timer, 0).await);
        // Head 0 arrives late in its period; head 1 is awaited from then on.
        tokio::time::sleep(LIMIT * 2 / 3).await;
        let waited = wait(&mut timer, 1).await;
        assert!(waited >= LIMIT, "{waited:?}");
    }

    /// A wait started where nothing reads still wakes the task: at its deadline, or earlier
    /// when the timer was armed for an earlier head (the reader's poll then moves it on).
    #[tokio::test]
    async fn a_wait_started_without_a_reader_wakes_the_task() {
        let woken = Arc::new(Woken(AtomicBool::new(false)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let until_woken = |woken: Arc<Woken>| async move {
            let started = Instant::now();
            while !woken.0.swap(false, Ordering::SeqCst) {
                assert!(started.elapsed() < 20 * LIMIT, "never woken");
                tokio::time::sleep(LIMIT / 20).await;
            }
        };
        let mut timer = HeadTimer::new(LIMIT);
        let head0 = Instant::now();
        assert!(timer.start(0, &mut cx).is_pending(), "a new timer");
        tokio::time::sleep(LIMIT / 2).await;
        let head1 = Instant::now();
        assert!(timer.start(1, &mut cx).is_pending(), "armed for head 0");
        until_woken(woken.clone()).await;
        assert!(
            head0.elapsed() >= LIMIT,
            "woken at head 0's deadline, not before"
        );
        wait(&mut timer, 1).await;
        assert!(head1.elapsed() >= LIMIT);
        // Fired for head 1; head 2 is awaited well after that.
        tokio::time::sleep(LIMIT).await;
        let head2 = Instant::now();
        assert!(timer.start(2, &mut cx).is_pending(), "fired: armed again");
        until_woken(woken.clone()).await;
        assert!(head2.elapsed() >= LIMIT);
    }

    /// A wait begun while the task's cooperative budget is spent (a read just before it was
    /// refused by the budget) still has a timer: a later `start` that relies on it is woken.
    #[tokio::test]
    async fn a_wait_begun_with_the_budget_spent_still_wakes_the_task() {
        let woken = Arc::new(Woken(AtomicBool::new(false)));
        let waker = Waker::from(woken.clone());
        let mut timer = HeadTimer::new(LIMIT);
        let first = poll_fn(|cx| {
            // Spends the budget of this poll, as a burst of pipelined requests does.
            for _ in 0..1_000 {
                let _ = pin!(tokio::task::consume_budget()).poll(cx);
            }
            Poll::Ready(timer.poll_expired(0, &mut Context::from_waker(&waker)))
        })
        .await;
        assert!(first.is_pending(), "head 0 has only just been awaited");
        tokio::task::yield_now().await;
        woken.0.store(false, Ordering::SeqCst);
        // Head 0 arrives, its answer is written, and head 1 is awaited where nothing reads.
        let head1 = Instant::now();
        assert!(timer
            .start(1, &mut Context::from_waker(&waker))
            .is_pending());
        while !woken.0.load(Ordering::SeqCst) {
            assert!(
                head1.elapsed() < 20 * LIMIT,
                "never woken: head 1 has no deadline"
            );
            tokio::time::sleep(LIMIT / 20).await;
        }
    }

    struct Woken(AtomicBool);

    impl std::task::Wake for Woken {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_timer_that_fired_for_a_head_no_longer_awaited_is_moved() {
        let mut timer = HeadTimer::new(LIMIT);
        assert!(!expired(&mut timer, 0).await);
        // Head 0 completed; head 1 is first awaited after head 0's deadline has passed.
        tokio::time::sleep(2 * LIMIT).await;
        let head1 = Instant::now();
        assert!(!expired(&mut timer, 1).await, "head 1 has just started");
        wait(&mut timer, 1).await;
        assert!(head1.elapsed() >= LIMIT, "{:?}", head1.elapsed());
    }
}
