//! `vigil-eval nab` end to end: a small NAB-layout directory in, the documented standard output
//! and detection files out.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-eval-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// `rows` five-minute readings from 2014-01-01 00:00: noise around 10, and 30 from row `shift`.
fn level_shift_csv(rows: usize, shift: usize) -> String {
    let mut csv = String::from("timestamp,value\n");
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..rows {
        // A small linear congruential generator keeps the series reproducible without a crate.
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let noise = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let level = if i >= shift { 30.0 } else { 10.0 };
        let minutes = i * 5;
        let (day, hour, minute) = (1 + minutes / 1440, (minutes / 60) % 24, minutes % 60);
        csv.push_str(&format!(
            "2014-01-{day:02} {hour:02}:{minute:02}:00,{:.3}\n",
            level + noise
        ));
    }
    csv
}

#[test]
fn nab_mode_prints_scores_and_writes_nab_ready_detections() {
    let dir = scratch("nab");
    let data = dir.join("data");
    fs::create_dir_all(data.join("synthetic")).expect("mkdir");
    // 1,500 rows; the shift at row 1,200 is 2014-01-05 04:00.
    fs::write(
        data.join("synthetic/level_shift.csv"),
        level_shift_csv(1500, 1200),
    )
    .expect("write series");
    fs::write(
        data.join("synthetic/unlabelled.csv"),
        level_shift_csv(600, 600),
    )
    .expect("write series");
    let windows = dir.join("windows.json");
    fs::write(
        &windows,
        r#"{"synthetic/level_shift.csv": [["2014-01-05 00:00:00.000000", "2014-01-05 12:00:00.000000"]]}"#,
    )
    .expect("write windows");
    let out = dir.join("detections");

    let run = Command::new(env!("CARGO_BIN_EXE_vigil-eval"))
        .arg("nab")
        .arg(&data)
        .arg(&windows)
        .arg("--detections")
        .arg(&out)
        .output()
        .expect("run vigil-eval");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");

    // Standard output: one `category/name.csv SCORE` line per file, then `mean SCORE`.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let score_of = |line: &str, name: &str| -> f64 {
        let (n, s) = line.rsplit_once(' ').expect("name and score");
        assert_eq!(n, name);
        s.parse().expect("numeric score")
    };
    let shift = score_of(lines[0], "synthetic/level_shift.csv");
    let unlabelled = score_of(lines[1], "synthetic/unlabelled.csv");
    let mean = score_of(lines[2], "mean");
    assert!(
        shift > 50.0,
        "the level shift is found early in its window: {shift}"
    );
    assert_eq!(unlabelled, 0.0, "a quiet file without windows scores 0");
    assert!((mean - (shift + unlabelled) / 2.0).abs() < 0.01);
    assert!(
        stderr.contains("has no entry in the windows file"),
        "{stderr}"
    );

    // Detections: every input row, `timestamp,value,score,alert`; scores reach one half only
    // on alert rows, so NAB's threshold of 0.5 sees exactly the alerts.
    let csv = fs::read_to_string(out.join("synthetic/level_shift.csv")).expect("detections");
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some("timestamp,value,score,alert"));
    let mut n = 0;
    let mut alerts = Vec::new();
    for (i, row) in rows.enumerate() {
        let f: Vec<&str> = row.split(',').collect();
        assert_eq!(f.len(), 4, "{row}");
        let score: f64 = f[2].parse().expect("score");
        match f[3] {
            "1" => {
                assert_eq!(score, 1.0, "{row}");
                alerts.push(i);
            }
            "0" => assert!((0.0..0.5).contains(&score), "{row}"),
            other => panic!("alert column must be 0 or 1, got {other}"),
        }
        n += 1;
    }
    assert_eq!(n, 1500);
    assert!(
        alerts.iter().any(|&i| (1200..1250).contains(&i)),
        "alert rows {alerts:?}"
    );
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn nab_mode_rejects_a_missing_directory_with_a_message() {
    let dir = scratch("missing");
    let run = Command::new(env!("CARGO_BIN_EXE_vigil-eval"))
        .arg("nab")
        .arg(dir.join("no-such-dir"))
        .arg(dir.join("no-such.json"))
        .output()
        .expect("run vigil-eval");
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    let _ = fs::remove_dir_all(&dir);
}
