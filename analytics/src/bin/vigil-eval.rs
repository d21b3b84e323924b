//! Offline evaluation of vigil's analytics on public benchmarks (NAB and NASA C-MAPSS).
//!
//! `vigil-eval nab DATA_DIR WINDOWS_JSON [--detections OUT_DIR] [--config JSON] [--seed N]
//! [--jobs N]` replays every NAB series, one `Reading` (time stamp and value) per row, through
//! the same streaming detector the broker uses and prints the NAB standard-profile score per file
//! (`category/name.csv SCORE`) and the mean of the files (`mean SCORE`, last) on standard output;
//! per-file diagnostics, per-category means and the pooled scores NAB's own scorer reports (the
//! summed raw scores of a category or of all files, normalised once) go to standard error.
//! `--seed` overrides the forest seed (after `--config`); `--jobs` replays files on that many
//! threads without changing any result. `--detections OUT_DIR` writes one
//! `timestamp,value,score,alert` file per series for NAB's own tools: `alert` is 1 on the rows
//! that open an incident and `score` is [`anomaly_score`], 1 on those rows and below one half on
//! all others, so thresholding either column at 0.5 gives the same detections.
//!
//! `vigil-eval cmapss DIR [--config JSON] [--subset FD00N]` trains the remaining-useful-life
//! model on `train_FD001.txt` (or on the one `train_FD00N.txt` in DIR when FD001 is not there, or
//! on the subset named) and prints the RMSE on that subset's test engines (`rmse X`, last).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vigil_analytics::detector::{DetectorConfig, DeviceDetector};
use vigil_analytics::nab::{anomaly_score, score_file, windows_to_rows, FileScore};
use vigil_analytics::rul::{self, RulConfig};
use vigil_analytics::telemetry::{parse_datetime_ms, Reading};

type BoxError = Box<dyn std::error::Error>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("nab") if args.len() >= 3 => run_nab(&args[1..]),
        Some("cmapss") if args.len() >= 2 => run_cmapss(&args[1..]),
        _ => {
            eprintln!(
                "usage:\n  vigil-eval nab DATA_DIR WINDOWS_JSON [--detections OUT_DIR] [--config JSON] [--seed N] [--jobs N]\n  vigil-eval cmapss DIR [--config JSON] [--subset FD00N]"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One NAB series: timestamps in unix milliseconds, the same timestamps as written in the file
/// (echoed in the detection files) and values.
struct Series {
    timestamps: Vec<i64>,
    stamps: Vec<String>,
    values: Vec<f64>,
}

/// Reads a whole text file, naming the file in the error.
fn read(path: &Path) -> Result<String, BoxError> {
    fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn read_series(path: &Path) -> Result<Series, BoxError> {
    let text = read(path)?;
    let mut timestamps = Vec::new();
    let mut stamps = Vec::new();
    let mut values = Vec::new();
    for (lineno, line) in text.lines().enumerate().skip(1) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (ts, v) = line.split_once(',').ok_or_else(|| {
            format!(
                "{}:{}: expected timestamp,value",
                path.display(),
                lineno + 1
            )
        })?;
        let t = parse_datetime_ms(ts.trim())
            .ok_or_else(|| format!("{}:{}: bad timestamp {ts}", path.display(), lineno + 1))?;
        let x: f64 = v
            .trim()
            .parse()
            .map_err(|e| format!("{}:{}: bad value {v:?}: {e}", path.display(), lineno + 1))?;
        timestamps.push(t);
        stamps.push(ts.trim().to_string());
        values.push(x);
    }
    Ok(Series {
        timestamps,
        stamps,
        values,
    })
}

fn run_nab(args: &[String]) -> Result<(), BoxError> {
    let data_dir = PathBuf::from(&args[0]);
    let windows_path = PathBuf::from(&args[1]);
    let mut out_dir: Option<PathBuf> = None;
    let mut config = DetectorConfig::default();
    let mut seed: Option<u64> = None;
    let mut jobs = 1usize;
    let mut rest = args[2..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--detections" => {
                out_dir = Some(PathBuf::from(
                    rest.next().ok_or("--detections needs a directory")?,
                ))
            }
            "--config" => {
                let json = rest.next().ok_or("--config needs a JSON object")?;
                config = serde_json::from_str(json)?;
            }
            "--seed" => {
                let v = rest.next().ok_or("--seed needs an integer")?;
                seed = Some(v.parse().map_err(|e| format!("--seed {v}: {e}"))?);
            }
            "--jobs" => {
                let v = rest.next().ok_or("--jobs needs an integer")?;
                jobs = v.parse().map_err(|e| format!("--jobs {v}: {e}"))?;
                jobs = jobs.max(1);
            }
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    if let Some(seed) = seed {
        config.seed = seed;
    }
    let windows_json: BTreeMap<String, Vec<[String; 2]>> =
        serde_json::from_str(&read(&windows_path)?)
            .map_err(|e| format!("{}: {e}", windows_path.display()))?;

    let mut files: Vec<(String, PathBuf)> = Vec::new();
    let mut categories: Vec<PathBuf> = fs::read_dir(&data_dir)
        .map_err(|e| format!("{}: {e}", data_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    categories.sort();
    for cat in categories {
        let mut csvs: Vec<PathBuf> = fs::read_dir(&cat)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .collect();
        csvs.sort();
        let cat_name = cat
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .to_string();
        for p in csvs {
            let name = p
                .file_name()
                .and_then(|s| s.to_str())
                .unwrap_or("?")
                .to_string();
            files.push((format!("{cat_name}/{name}"), p));
        }
    }
    if files.is_empty() {
        return Err(format!("no CSV files under {}", data_dir.display()).into());
    }

    let results = evaluate_files(&files, &config, &windows_json, &out_dir, jobs)?;
    let mut per_category: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    // NAB's own scorer normalises a category's summed raw scores, not the files' mean.
    let mut pooled: BTreeMap<String, FileScore> = BTreeMap::new();
    let mut corpus = FileScore::default();
    let mut all = Vec::new();
    for (key, r) in files.iter().map(|(k, _)| k).zip(&results) {
        let s = r.score.normalized();
        // Standard output carries exactly `name score` lines and the final `mean` line, so
        // scripts can parse it; the diagnostics go to standard error.
        println!("{key} {s:.2}");
        eprintln!(
            "  {key}: windows {} detected {} false positives {} alerts {} raw {:.3}",
            r.windows, r.score.tp, r.score.fp, r.alerts, r.score.raw
        );
        let category = key.split('/').next().unwrap_or("?").to_string();
        add_totals(pooled.entry(category.clone()).or_default(), &r.score);
        add_totals(&mut corpus, &r.score);
        per_category.entry(category).or_default().push(s);
        all.push(s);
    }
    for (cat, scores) in &per_category {
        let summed = pooled.get(cat).map_or(0.0, FileScore::normalized);
        eprintln!(
            "category {cat} {:.2} ({} files; pooled as NAB's scorer does: {summed:.2})",
            mean(scores),
            scores.len()
        );
    }
    eprintln!(
        "all files pooled as NAB's scorer does: {:.2}",
        corpus.normalized()
    );
    println!("mean {:.2}", mean(&all));
    Ok(())
}

/// Adds `s`'s raw, null and perfect scores to `into` (NAB's pooled normalisation).
fn add_totals(into: &mut FileScore, s: &FileScore) {
    into.raw += s.raw;
    into.null += s.null;
    into.perfect += s.perfect;
}

/// Outcome of replaying one NAB file.
struct FileResult {
    score: FileScore,
    windows: usize,
    alerts: usize,
}

/// Replays every file, on `jobs` threads (files are handed out in order; results keep it).
fn evaluate_files(
    files: &[(String, PathBuf)],
    config: &DetectorConfig,
    windows_json: &BTreeMap<String, Vec<[String; 2]>>,
    out_dir: &Option<PathBuf>,
    jobs: usize,
) -> Result<Vec<FileResult>, BoxError> {
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<Result<FileResult, String>>>> =
        files.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(files.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((key, path)) = files.get(i) else {
                    break;
                };
                let r = evaluate_file(key, path, config, windows_json, out_dir)
                    .map_err(|e| e.to_string());
                if let Ok(mut slot) = slots[i].lock() {
                    *slot = Some(r);
                }
            });
        }
    });
    slots
        .into_iter()
        .map(|m| match m.into_inner() {
            Ok(Some(r)) => r.map_err(BoxError::from),
            _ => Err("a worker thread failed".into()),
        })
        .collect()
}

fn evaluate_file(
    key: &str,
    path: &Path,
    config: &DetectorConfig,
    windows_json: &BTreeMap<String, Vec<[String; 2]>>,
    out_dir: &Option<PathBuf>,
) -> Result<FileResult, BoxError> {
    let series = read_series(path)?;
    let mut detector = DeviceDetector::new(config.clone())?;
    let mut alerts = Vec::with_capacity(series.values.len());
    let mut scores = Vec::with_capacity(series.values.len());
    for (&t, &v) in series.timestamps.iter().zip(&series.values) {
        // Replayed like live telemetry: one reading per row, with its time stamp.
        let reading = Reading {
            timestamp_ms: t,
            device_time: true,
            metrics: vec![("value".to_string(), v)],
        };
        let o = detector
            .feed(&reading)
            .pop()
            .ok_or("the detector refused the metric")?
            .outcome;
        detector.refit_inline()?;
        alerts.push(o.alert.is_some());
        scores.push(o.score);
    }
    let windows: Vec<(i64, i64)> = match windows_json.get(key) {
        Some(ws) => ws
            .iter()
            .map(|[s, e]| {
                let s = parse_datetime_ms(s).ok_or_else(|| format!("bad window start {s}"))?;
                let e = parse_datetime_ms(e).ok_or_else(|| format!("bad window end {e}"))?;
                Ok((s, e))
            })
            .collect::<Result<_, BoxError>>()?,
        None => {
            eprintln!("note: {key} has no entry in the windows file; scoring it as window-free");
            Vec::new()
        }
    };
    let rows = windows_to_rows(&series.timestamps, &windows);
    let score = score_file(&alerts, &rows);
    if let Some(dir) = out_dir {
        let target = dir.join(key);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut csv = String::from("timestamp,value,score,alert\n");
        for (((ts, v), sc), al) in series
            .stamps
            .iter()
            .zip(&series.values)
            .zip(&scores)
            .zip(&alerts)
        {
            let sc = anomaly_score(*sc, *al);
            // Writing into a String cannot fail.
            let _ = writeln!(csv, "{ts},{v},{sc:.6},{}", u8::from(*al));
        }
        fs::write(&target, csv)?;
    }
    Ok(FileResult {
        score,
        windows: rows.len(),
        alerts: alerts.iter().filter(|a| **a).count(),
    })
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

/// The C-MAPSS subset to evaluate in `dir`: `FD001` when its training file is there, otherwise
/// the only subset whose training file is (`train_FD003.txt` alone gives `FD003`).
fn cmapss_subset(dir: &Path) -> Result<String, BoxError> {
    if dir.join("train_FD001.txt").is_file() {
        return Ok("FD001".into());
    }
    let mut found: Vec<String> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            Some(
                name.strip_prefix("train_")?
                    .strip_suffix(".txt")?
                    .to_string(),
            )
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.swap_remove(0)),
        0 => Err(format!("no train_FD00N.txt in {}", dir.display()).into()),
        _ => Err(format!(
            "several subsets in {} ({}): choose one with --subset",
            dir.display(),
            found.join(", ")
        )
        .into()),
    }
}

fn run_cmapss(args: &[String]) -> Result<(), BoxError> {
    let dir = Path::new(&args[0]);
    let mut config = RulConfig::default();
    let mut subset = None;
    let mut rest = args[1..].iter();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "--config" => {
                let json = rest.next().ok_or("--config needs a JSON object")?;
                config = serde_json::from_str(json)?;
            }
            "--subset" => subset = Some(rest.next().ok_or("--subset needs a name")?.clone()),
            other => return Err(format!("unknown option {other}").into()),
        }
    }
    let subset = match subset {
        Some(s) => s,
        None => cmapss_subset(dir)?,
    };
    let train = rul::parse_cmapss(&read(&dir.join(format!("train_{subset}.txt")))?)?;
    let test = rul::parse_cmapss(&read(&dir.join(format!("test_{subset}.txt")))?)?;
    let truth: Vec<f64> = read(&dir.join(format!("RUL_{subset}.txt")))?
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .collect();
    let model = rul::RulModel::train(&train, &config)?;
    let preds = model.predict_last(&test)?;
    if preds.len() != truth.len() {
        return Err(format!(
            "{} test engines but {} true RUL values",
            preds.len(),
            truth.len()
        )
        .into());
    }
    let mse = preds
        .iter()
        .zip(&truth)
        .map(|((_, p), t)| (p - t).powi(2))
        .sum::<f64>()
        / truth.len() as f64;
    eprintln!(
        "{subset}: trained on {} engines ({} cycles), {} features",
        rul::engine_count(&train),
        train.len(),
        model.n_features()
    );
    println!("rmse {:.2}", mse.sqrt());
    Ok(())
}
