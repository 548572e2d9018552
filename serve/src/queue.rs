//! The scheduler: a bounded queue of jobs (one request's rows each) in front of the engine's
//! worker thread, which forms batches dynamically: it takes the first waiting job, then keeps
//! taking jobs (waiting at most `max_wait` for more when the previous batch held several: a lone
//! client never waits) while the batch stays within the token
//! and row budgets. A job is never split, and one larger than the budget runs alone.

use crate::contract::{Compute, Row};
use crate::metrics::Metrics;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long the queue stays empty before the engine gives its freed memory back.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// A computed job: candidate log-probabilities `[row][label]` and how long it waited.
#[derive(Debug)]
pub struct Answer {
    pub scores: Vec<Vec<f64>>,
    /// From queueing to the start of the batch that computed it (the batch wait included).
    pub queued: Duration,
    /// The compute time of that batch (shared with the other jobs in it).
    pub computed: Duration,
}

/// A job's answer, or why it failed.
pub type JobResult = Result<Answer, String>;

/// One request's rows and where its answer goes.
pub struct Job {
    pub rows: Vec<Row>,
    pub reply: oneshot::Sender<JobResult>,
    /// When it was queued (`Job::new`).
    submitted: Instant,
}

impl Job {
    /// A job queued now.
    pub fn new(rows: Vec<Row>, reply: oneshot::Sender<JobResult>) -> Self {
        Self { rows, reply, submitted: Instant::now() }
    }
}

/// Batching limits.
#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Batch jobs together at all (off: one request per forward pass).
    pub batching: bool,
    /// Most tokens (prompt bodies, plus prefixes when not cached) in one batch.
    pub max_batch_tokens: usize,
    /// Most rows in one batch.
    pub max_batch_rows: usize,
    /// Longest wait for more jobs once a batch has one.
    pub max_wait: Duration,
    /// Wait even when the last batch held one job (`--max-batch-wait-ms` given); by default a
    /// batch waits only under concurrency, so a lone client never waits.
    pub always_wait: bool,
    /// Most jobs waiting; more are refused (503).
    pub max_queue: usize,
}

/// Why a job was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue holds `max_queue` jobs.
    QueueFull,
    /// The engine has stopped.
    Stopped,
}

/// The queue and the engine thread behind it.
pub struct Scheduler {
    tx: Mutex<Option<Sender<Job>>>,
    depth: Arc<AtomicUsize>,
    opts: BatchOptions,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the engine thread.
    pub fn start(engine: Box<dyn Compute>, opts: BatchOptions, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let depth = Arc::new(AtomicUsize::new(0));
        let worker = Worker { engine, rx, depth: depth.clone(), opts, metrics: metrics.clone() };
        let thread = std::thread::Builder::new().name("verdict-engine".into()).spawn(move || worker.run())?;
        Ok(Self { tx: Mutex::new(Some(tx)), depth, opts, metrics, thread: Mutex::new(Some(thread)) })
    }

    /// Queues a job, unless the queue is full.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.depth.fetch_add(1, Ordering::SeqCst) >= self.opts.max_queue {
            self.depth.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        match tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => {
                self.metrics.queue_depth.store(self.depth.load(Ordering::SeqCst) as u64, Ordering::Relaxed);
                Ok(())
            }
            _ => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(SubmitError::Stopped)
            }
        }
    }

    /// Stops taking jobs, lets the engine finish the queued ones, and waits for it.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    engine: Box<dyn Compute>,
    rx: Receiver<Job>,
    depth: Arc<AtomicUsize>,
    opts: BatchOptions,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn took_one(&self) {
        let d = self.depth.fetch_sub(1, Ordering::SeqCst).saturating_sub(1);
        self.metrics.queue_depth.store(d as u64, Ordering::Relaxed);
    }

    fn cost(&self, job: &Job) -> usize {
        job.rows.iter().map(|r| self.engine.cost(r)).sum()
    }

    fn run(mut self) {
        let mut carry: Option<Job> = None;
        // Wait for more jobs only under concurrency (the last batch held several): a lone
        // client's request then runs at once, as without batching.
        let mut concurrent = false;
        // Whether the allocator's free pages went back since the last batch: the forward's
        // temporaries stay mapped under load (shared::memory) and are returned once the
        // queue has been empty for IDLE_RELEASE.
        let mut released = true;
        loop {
            let first = match carry.take() {
                Some(j) => j,
                None => {
                    let next = if released {
                        self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    } else {
                        self.rx.recv_timeout(IDLE_RELEASE)
                    };
                    match next {
                        Ok(j) => {
                            self.took_one();
                            j
                        }
                        Err(RecvTimeoutError::Timeout) => {
                            shared::memory::release_free_pages();
                            released = true;
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return, // every sender is gone: shut down
                    }
                }
            };
            released = false;
            let (mut rows, mut tokens) = (first.rows.len(), self.cost(&first));
            let mut jobs = vec![first];
            if self.opts.batching {
                let wait = if concurrent || self.opts.always_wait { self.opts.max_wait } else { Duration::ZERO };
                let deadline = Instant::now() + wait;
                while rows < self.opts.max_batch_rows && tokens < self.opts.max_batch_tokens {
                    let now = Instant::now();
                    let next = if now >= deadline {
                        self.rx.try_recv().map_err(|_| RecvTimeoutError::Timeout)
                    } else {
                        self.rx.recv_timeout(deadline - now)
                    };
                    let Ok(job) = next else { break };
                    self.took_one();
                    let cost = self.cost(&job);
                    if rows + job.rows.len() > self.opts.max_batch_rows || tokens + cost > self.opts.max_batch_tokens {
                        carry = Some(job);
                        break;
                    }
                    rows += job.rows.len();
                    tokens += cost;
                    jobs.push(job);
                }
            }
            concurrent = jobs.len() > 1 || carry.is_some();
            self.run_batch(jobs, tokens);
        }
    }

    fn run_batch(&mut self, jobs: Vec<Job>, tokens: usize) {
        // A job whose client gave up (timeout, disconnect) is not computed.
        let jobs: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if jobs.is_empty() {
            return;
        }
        let rows: Vec<&Row> = jobs.iter().flat_map(|j| j.rows.iter()).collect();
        let start = Instant::now();
        // A panic in the model code fails this batch's requests, never the server.
        let result = catch_unwind(AssertUnwindSafe(|| self.engine.score(&rows)));
        let computed = start.elapsed();
        self.metrics.batch(rows.len(), tokens, computed);
        let n_rows = rows.len();
        drop(rows);
        match result {
            Ok(Ok(scores)) if scores.len() == n_rows => {
                let mut scores = scores.into_iter();
                for job in jobs {
                    let mine: Vec<Vec<f64>> = scores.by_ref().take(job.rows.len()).collect();
                    let queued = start.saturating_duration_since(job.submitted);
                    let _ = job.reply.send(Ok(Answer { scores: mine, queued, computed }));
                }
            }
            Ok(Ok(_)) => Self::fail(jobs, "the engine returned the wrong number of rows".into()),
            Ok(Err(e)) => Self::fail(jobs, e.to_string()),
            Err(_) => Self::fail(jobs, "the engine panicked on this batch".into()),
        }
    }

    fn fail(jobs: Vec<Job>, message: String) {
        tracing::error!(requests = jobs.len(), "batch failed: {message}");
        for job in jobs {
            let _ = job.reply.send(Err(message.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::TaskEntry;

    /// Takes 100 ms per batch and records each batch's size.
    struct Fake(Arc<Mutex<Vec<usize>>>);

    impl Compute for Fake {
        fn score(&mut self, rows: &[&Row]) -> Result<Vec<Vec<f64>>, models::Error> {
            self.0.lock().unwrap().push(rows.len());
            std::thread::sleep(Duration::from_millis(100));
            Ok(rows.iter().map(|_| vec![0.0, 0.0]).collect())
        }
        fn cost(&self, row: &Row) -> usize {
            row.body.len()
        }
    }

    /// `mr` with no prefix or answers: the scheduler reads neither.
    fn entry() -> Arc<TaskEntry> {
        let task = shared::task::TaskRegistry::builtin().get("mr").expect("mr is built in").clone();
        Arc::new(TaskEntry {
            task,
            prefix_text: String::new(),
            prefix_ids: Vec::new(),
            answers: Vec::new(),
            scoring: None,
        })
    }

    fn job(entry: &Arc<TaskEntry>) -> (Job, oneshot::Receiver<JobResult>) {
        let (tx, rx) = oneshot::channel();
        let row = Row { task: entry.clone(), version: None, body: vec![1, 2, 3], type_ids: Vec::new() };
        (Job::new(vec![row], tx), rx)
    }

    fn start(always_wait: bool) -> (Scheduler, Arc<Mutex<Vec<usize>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let opts = BatchOptions {
            batching: true,
            max_batch_tokens: 1 << 20,
            max_batch_rows: 64,
            max_wait: Duration::from_millis(1500),
            always_wait,
            max_queue: 16,
        };
        let s = Scheduler::start(Box::new(Fake(batches.clone())), opts, Arc::new(Metrics::default())).unwrap();
        (s, batches)
    }

    #[test]
    fn a_lone_request_never_waits_unless_the_wait_is_asked_for() {
        let entry = entry();
        // Default: the first request of a quiet server runs at once.
        let (s, _) = start(false);
        let (j, rx) = job(&entry);
        let t = Instant::now();
        s.submit(j).unwrap();
        let answer = rx.blocking_recv().unwrap().unwrap();
        // 100 ms of compute, and the answer says it did not wait in the queue.
        assert!(t.elapsed() < Duration::from_millis(1000), "waited {:?}", t.elapsed());
        assert!(answer.queued < Duration::from_millis(1000), "queued {:?}", answer.queued);
        // `--max-batch-wait-ms` given: the batch waits its whole window for company, and the
        // answer counts that window as queue time.
        let (s, batches) = start(true);
        let (j, rx) = job(&entry);
        let t = Instant::now();
        s.submit(j).unwrap();
        let answer = rx.blocking_recv().unwrap().unwrap();
        assert!(t.elapsed() >= Duration::from_millis(1500), "did not wait: {:?}", t.elapsed());
        assert!(answer.queued >= Duration::from_millis(1500) && answer.queued <= t.elapsed(), "{:?}", answer.queued);
        assert_eq!(*batches.lock().unwrap(), vec![1]);
    }

    #[test]
    fn requests_queued_together_share_a_batch_without_waiting() {
        let entry = entry();
        let (s, batches) = start(false);
        // The first request starts a 100 ms batch at once; the four queued meanwhile share the next.
        let jobs: Vec<_> = (0..5).map(|_| job(&entry)).collect();
        let mut rxs = Vec::new();
        for (j, rx) in jobs {
            s.submit(j).unwrap();
            rxs.push(rx);
        }
        for rx in rxs {
            rx.blocking_recv().unwrap().unwrap();
        }
        let b = batches.lock().unwrap().clone();
        assert_eq!(b.iter().sum::<usize>(), 5);
        assert!(b.len() <= 2, "the queued requests share one batch: {b:?}");
    }
}
