//! Drives the load (closed or open loop) and times each stream.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::sse::{is_error, tokens_in, EventSplitter};
use crate::stats::{percentile, Samples};
use crate::{Args, Route};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Target {
    client: HttpClient,
    uri: hyper::Uri,
    body: Bytes,
    timeout: Duration,
}

fn target(args: &Args, timeout: Duration) -> Result<Target, String> {
    let mut http = HttpConnector::new();
    // Without it, Nagle + delayed ACK can hold a request's last segment for 40 ms.
    http.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(http);
    let prompt = vec!["hello"; args.input_words.max(1)].join(" ");
    let (path, body) = match args.route {
        Route::Chat => (
            "/v1/chat/completions",
            serde_json::json!({
                "model": args.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "stream": true,
            }),
        ),
        Route::Generate => (
            "/generate_stream",
            serde_json::json!({
                "inputs": prompt,
                "parameters": {"max_new_tokens": args.max_tokens},
            }),
        ),
    };
    let uri = format!("{}{}", args.url.trim_end_matches('/'), path)
        .parse()
        .map_err(|e| format!("--url {}: {e}", args.url))?;
    Ok(Target {
        client,
        uri,
        body: Bytes::from(body.to_string()),
        timeout,
    })
}

/// One streamed request, timed from just before it is sent.
async fn one(t: Arc<Target>) -> Samples {
    let mut s = Samples::default();
    let start = Instant::now();
    let outcome = tokio::time::timeout(t.timeout, stream(&t, start, &mut s)).await;
    if !matches!(outcome, Ok(true)) {
        s.errors += 1;
    } else {
        s.ok += 1;
    }
    s.busy_s = start.elapsed().as_secs_f64();
    s
}

/// Reads the stream into `s`; false on any failure.
async fn stream(t: &Target, start: Instant, s: &mut Samples) -> bool {
    let req = match Request::post(t.uri.clone())
        .header("content-type", "application/json")
        .body(Full::new(t.body.clone()))
    {
        Ok(r) => r,
        Err(_) => return false,
    };
    let Ok(resp) = t.client.request(req).await else {
        return false;
    };
    if !resp.status().is_success() {
        return false;
    }
    let mut body = resp.into_body();
    let mut splitter = EventSplitter::default();
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;
    let mut tokens = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { return false };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        for event in splitter.push(data) {
            if is_error(&event) {
                return false;
            }
            let n = tokens_in(&event);
            if n == 0 {
                continue;
            }
            match last {
                None => {
                    s.ttft.push((now - start).as_secs_f64());
                    first = Some(now);
                }
                Some(prev) => s.itl.push((now - prev).as_secs_f64() / n as f64),
            }
            last = Some(now);
            tokens += n;
            s.tokens += n as u64;
        }
    }
    if let (Some(first), Some(last)) = (first, last) {
        // The first event may carry several tokens; counted as aiperf does, by tokens.
        if tokens > 1 {
            s.itl_request
                .push((last - first).as_secs_f64() / (tokens - 1) as f64);
        }
    }
    last.is_some()
}

async fn closed_loop(t: Arc<Target>, concurrency: usize, requests: usize) -> Samples {
    let left = Arc::new(AtomicUsize::new(requests));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(requests) {
        let (t, left) = (t.clone(), left.clone());
        workers.spawn(async move {
            let mut mine = Samples::default();
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                mine.merge(one(t.clone()).await);
            }
            mine
        });
    }
    collect(workers).await
}

async fn open_loop(t: Arc<Target>, rate: f64, requests: usize, seed: u64) -> Samples {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut due = tokio::time::Instant::now();
    let mut streams = JoinSet::new();
    for _ in 0..requests {
        // Exponential gaps: a Poisson process, so arrivals fall at every phase of the
        // engine's iteration, as independent users' do.
        let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
        due += Duration::from_secs_f64(-u.ln() / rate);
        tokio::time::sleep_until(due).await;
        streams.spawn(one(t.clone()));
    }
    collect(streams).await
}

async fn collect(mut set: JoinSet<Samples>) -> Samples {
    let mut all = Samples::default();
    while let Some(done) = set.join_next().await {
        match done {
            Ok(s) => all.merge(s),
            Err(_) => all.errors += 1,
        }
    }
    all
}

pub async fn run(args: &Args, timeout: Duration) -> Result<String, String> {
    let t = Arc::new(target(args, timeout)?);
    if args.warmup > 0 {
        let c = args.concurrency.unwrap_or(args.warmup).min(args.warmup);
        closed_loop(t.clone(), c, args.warmup).await;
    }
    let started = Instant::now();
    let mut s = match (args.concurrency, args.rate) {
        (Some(c), _) => closed_loop(t, c, args.requests).await,
        (None, Some(r)) => open_loop(t, r, args.requests, args.seed).await,
        (None, None) => return Err("give --concurrency or --rate".into()),
    };
    let wall = started.elapsed().as_secs_f64();
    let ms = |v: f64| v * 1000.0;
    let report = serde_json::json!({
        "requests": args.requests,
        "ok": s.ok,
        "errors": s.errors,
        "wall_s": wall,
        "req_s": s.ok as f64 / wall,
        "output_tokens": s.tokens,
        "output_tok_s": s.tokens as f64 / wall,
        "mean_in_flight": s.busy_s / wall,
        "ttft_p50_ms": ms(percentile(&mut s.ttft, 50.0)),
        "ttft_p99_ms": ms(percentile(&mut s.ttft, 99.0)),
        "itl_p50_ms": ms(percentile(&mut s.itl, 50.0)),
        "itl_p99_ms": ms(percentile(&mut s.itl, 99.0)),
        "itl_request_p50_ms": ms(percentile(&mut s.itl_request, 50.0)),
        "itl_request_p99_ms": ms(percentile(&mut s.itl_request, 99.0)),
    });
    Ok(report.to_string())
}
