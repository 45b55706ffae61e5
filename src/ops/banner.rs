//! The start-up banner, in the shape of `celery worker`'s (`celery/apps/worker.py`).

use crate::config::{AppInfo, WorkerSettings};

pub fn render(app: &AppInfo, settings: &WorkerSettings) -> String {
    let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S");
    let uname = nix::sys::utsname::uname()
        .map(|u| {
            format!(
                "{}-{}-{}",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.machine().to_string_lossy()
            )
        })
        .unwrap_or_else(|_| "unknown".into());
    let events = if settings.task_events { "ON" } else { "OFF (enable -E to monitor tasks in this worker)" };
    let results = app.result_backend.as_deref().unwrap_or("disabled://");
    let mut out = format!(
        "
 -------------- {hostname} v{version} (celeriac {ours})
--- ***** -----
-- ******* ---- {uname} {now}
- *** --- * ---
- ** ---------- [config]
- ** ---------- .> app:         {app_name}
- ** ---------- .> transport:   {transport}
- ** ---------- .> results:     {results}
- ** ---------- .> python:      {python} ({executable})
- *** --- * --- .> concurrency: {concurrency} (prefork, celeriac)
-- ******* ---- .> task events: {events}
--- ***** -----
 -------------- [queues]
",
        hostname = settings.hostname,
        version = app.celery_version,
        ours = env!("CARGO_PKG_VERSION"),
        app_name = app.app,
        transport = app.broker_display,
        concurrency = settings.concurrency,
        python = app.python_version,
        executable = app.executable,
    );
    for q in &settings.queues {
        out.push_str(&format!(
            "                .> {:<16} exchange={}({}) key={}\n",
            q.name, q.exchange, q.exchange_type, q.routing_key
        ));
    }
    let mut names: Vec<&String> = app.tasks.keys().filter(|n| !n.starts_with("celery.")).collect();
    names.sort();
    out.push_str("\n[tasks]\n");
    for n in names {
        out.push_str(&format!("  . {n}\n"));
    }
    out
}
