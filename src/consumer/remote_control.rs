//! The worker's answers to `celery inspect` / `celery control` (`celery/worker/control.py`),
//! run against the consumer's own state. Formats: reference §8.3.

use serde_json::{json, Map, Value};
use tracing::{error, info, warn};

use super::{Consumer, Job};
use crate::control::{error as nok, ok, ControlRequest};
use crate::ops::signals::Stop;

/// Signal names `revoke(terminate=True, signal=...)` accepts (`celery.platforms.signals`).
fn signum(name: Option<&str>) -> Option<i32> {
    let name = name.unwrap_or("SIGTERM").to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name).to_owned();
    if let Ok(n) = name.parse::<i32>() {
        return Some(n);
    }
    Some(match name.as_str() {
        "TERM" => libc::SIGTERM,
        "KILL" => libc::SIGKILL,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "HUP" => libc::SIGHUP,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        _ => return None,
    })
}

/// Python's repr of a set of strings, as `ok(f'tasks {task_ids} flagged as revoked')` prints it.
fn py_set(ids: &[String]) -> String {
    let items: Vec<String> = ids.iter().map(|i| format!("'{i}'")).collect();
    format!("{{{}}}", items.join(", "))
}

fn id_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

impl Consumer {
    /// Run one pidbox request; the reply (if the client wants one) goes back through the
    /// transport. Returns nothing: replies are queued for the replier task.
    pub(super) fn on_control(&mut self, request: ControlRequest) {
        self.clock = self.clock.max(request.clock) + 1;
        if !request.is_for(&self.settings.hostname) {
            return;
        }
        let args = &request.arguments;
        let reply = match request.method.as_str() {
            "ping" => Some(ok("pong")),
            "clock" => Some(json!({"clock": self.clock})),
            "revoke" => Some(self.revoke(id_list(args.get("task_id")), args)),
            "terminate" => {
                let mut args = args.clone();
                args.insert("terminate".into(), Value::Bool(true));
                Some(self.revoke(id_list(args.get("task_id")), &args))
            }
            "revoke_by_stamped_headers" => Some(self.revoke_by_stamps(args)),
            "revoked" => Some(json!(self.revoked.ids())),
            "rate_limit" => Some(self.set_rate_limit(args)),
            "time_limit" => Some(self.set_time_limit(args)),
            "active" => Some(Value::Array(self.active_infos())),
            "reserved" => Some(Value::Array(self.reserved_infos())),
            "scheduled" => Some(Value::Array(self.scheduled_infos())),
            "query_task" => Some(self.query_task(id_list(args.get("ids").or(args.get("task_id"))))),
            "registered" => Some(self.registered()),
            "stats" => Some(self.stats()),
            "active_queues" => Some(self.active_queues()),
            "conf" => Some(self.app_conf.clone()),
            "enable_events" => {
                self.events.task_events = true;
                info!("Events of group {{task}} enabled by remote.");
                Some(ok("task events enabled"))
            }
            "disable_events" => {
                self.events.task_events = false;
                info!("Events of group {{task}} disabled by remote.");
                Some(ok("task events disabled"))
            }
            "pool_grow" | "pool_shrink" if self.autoscaler.is_some() => Some(nok(format!(
                "{} is not supported with autoscale. Adjust autoscale range instead.",
                request.method
            ))),
            "autoscale" => Some(self.update_autoscale(args)),
            "add_consumer" => Some(self.add_consumer(args)),
            "cancel_consumer" => Some(self.cancel_consumer(args)),
            "pool_grow" | "pool_shrink" => {
                let grow = request.method == "pool_grow";
                let n = args.get("n").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
                if self.resize(grow, n) {
                    info!("Pool {} by {n} to {} by remote", if grow { "grows" } else { "shrinks" }, self.concurrency);
                    Some(ok(if grow { "pool will grow" } else { "pool will shrink" }))
                } else {
                    Some(nok("pool already at minimum"))
                }
            }
            "heartbeat" => {
                self.send_heartbeat();
                None
            }
            "hello" => {
                let from = args.get("from_node").and_then(Value::as_str).unwrap_or("");
                if from == self.settings.hostname {
                    None
                } else {
                    for id in id_list(args.get("revoked")) {
                        self.revoked.add(&id);
                    }
                    Some(json!({"revoked": self.revoked.ids(), "clock": self.clock}))
                }
            }
            "shutdown" => {
                warn!("Got shutdown from remote");
                self.begin_stop(Stop::Warm { exit_code: 0 });
                return; // stock raises WorkerShutdown: no reply
            }
            other => {
                error!("pidbox command error: KeyError('{other}')");
                Some(nok(format!("KeyError('{other}')")))
            }
        };
        if let (Some(to), Some(ticket)) = (request.reply_to, request.ticket) {
            let mut body = Map::new();
            body.insert(self.settings.hostname.clone(), reply.unwrap_or(Value::Null));
            self.clock += 1;
            let _ = self.replies.send((to, ticket, self.clock, Value::Object(body)));
        }
    }

    /// `autoscale max min` (`Autoscaler.update`): the prefetch window follows the new maximum.
    fn update_autoscale(&mut self, args: &Map<String, Value>) -> Value {
        let Some(scaler) = self.autoscaler.as_mut() else {
            return nok("ValueError('Autoscale not enabled')");
        };
        let number = |k: &str| {
            args.get(k).and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))).map(|n| n as usize)
        };
        let (max, min) = (number("max"), number("min"));
        let old_max = scaler.max;
        if let Some(target) = scaler.update(max, min, self.concurrency) {
            self.concurrency = target;
        }
        let (max, min) = (scaler.max, scaler.min);
        let delta = (max as isize - old_max as isize) * self.settings.prefetch_multiplier as isize;
        self.change_prefetch(delta);
        ok(format!("autoscale now max={max} min={min}"))
    }

    /// `add_consumer` (`Consumer.add_task_queue`): a queue the app defines is consumed as
    /// defined; another is created with a direct exchange and routing key of its own name.
    fn add_consumer(&mut self, args: &Map<String, Value>) -> Value {
        let Some(queue) = args.get("queue").and_then(Value::as_str).map(str::to_owned) else {
            return nok("TypeError(\"add_consumer() missing 1 required positional argument: 'queue'\")");
        };
        if !self.queues.borrow().iter().any(|q| q.name == queue) {
            let spec = match self.known_queues.iter().find(|q| q.name == queue) {
                Some(known) => known.clone(),
                None => crate::transport::QueueSpec::from_control(&queue, args),
            };
            self.queues.send_modify(|queues| queues.push(spec));
            info!("Started consuming from {queue}");
        }
        ok(format!("add consumer {queue}"))
    }

    /// `cancel_consumer` (`Consumer.cancel_task_queue`).
    fn cancel_consumer(&mut self, args: &Map<String, Value>) -> Value {
        let Some(queue) = args.get("queue").and_then(Value::as_str).map(str::to_owned) else {
            return nok("TypeError(\"cancel_consumer() missing 1 required positional argument: 'queue'\")");
        };
        info!("Canceling queue {queue}");
        self.queues.send_if_modified(|queues| {
            let before = queues.len();
            queues.retain(|q| q.name != queue);
            queues.len() != before
        });
        ok(format!("no longer consuming from {queue}"))
    }

    /// `celery/worker/control.py: revoke/_revoke`.
    fn revoke(&mut self, ids: Vec<String>, args: &Map<String, Value>) -> Value {
        for id in &ids {
            self.revoked.add(id);
        }
        // Ids not running here get REVOKED stored now (unless another worker owns the result).
        // Those queued behind a running task run too: they are in their child's hands.
        let running: Vec<&str> = self
            .active
            .values()
            .filter_map(|j| j.task())
            .chain(self.queued_requests())
            .map(|r| r.message.id.as_str())
            .collect();
        let elsewhere: Map<String, Value> = ids
            .iter()
            .filter(|id| !running.contains(&id.as_str()))
            .map(|id| (id.clone(), Value::from(self.name_of(id))))
            .collect();
        if !elsewhere.is_empty() {
            self.ready.push_back(Job::Record(json!({"reason": "revoke_ids", "ids": elsewhere})));
        }
        if !args.get("terminate").and_then(Value::as_bool).unwrap_or(false) {
            return ok(format!("tasks {} flagged as revoked", py_set(&ids)));
        }
        let Some(sig) = signum(args.get("signal").and_then(Value::as_str)) else {
            return nok(format!("unknown signal {:?}", args.get("signal")));
        };
        let mut terminated = Vec::new();
        let mut names_queued = Vec::new();
        for (index, job) in self.active.iter_mut() {
            if let Job::Task(r) = job {
                if ids.contains(&r.message.id) && r.terminated.is_none() {
                    info!("Terminating {} ({sig})", r.message.id);
                    r.terminated = Some(sig);
                    terminated.push((*index, r.message.id.clone()));
                }
            }
        }
        for r in self.queued.values_mut().flat_map(super::pipeline::Queued::iter_mut) {
            if ids.contains(&r.message.id) && r.terminated.is_none() {
                // Signalled when it starts (`Consumer::on_job_started`).
                info!("Terminating {} ({sig}) when it starts", r.message.id);
                r.terminated = Some(sig);
                names_queued.push(r.message.id.clone());
            }
        }
        if terminated.is_empty() && names_queued.is_empty() {
            return ok("terminate: tasks unknown");
        }
        for (index, _) in &terminated {
            if let Ok(signal) = nix::sys::signal::Signal::try_from(sig) {
                self.pool.signal(*index, signal);
            }
        }
        let names: Vec<String> = terminated.into_iter().map(|(_, id)| id).chain(names_queued).collect();
        ok(format!("terminate: {}", names.join(", ")))
    }

    /// The task name of a request we hold, if any.
    fn name_of(&self, id: &str) -> Option<String> {
        self.held_requests().find(|r| r.message.id == id).map(|r| r.message.name.clone())
    }

    /// `revoke_by_stamped_headers`: revoke every request we hold whose stamps match.
    fn revoke_by_stamps(&mut self, args: &Map<String, Value>) -> Value {
        let Some(wanted) = args.get("headers").and_then(Value::as_object).cloned() else {
            return nok("headers must be a mapping");
        };
        let matches = |stamps: &Map<String, Value>| {
            wanted.iter().any(|(k, v)| {
                let want: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    one => vec![one],
                };
                match stamps.get(k) {
                    Some(Value::Array(have)) => have.iter().any(|h| want.contains(&h)),
                    Some(have) => want.contains(&have),
                    None => false,
                }
            })
        };
        let ids: Vec<String> =
            self.held_requests().filter(|r| matches(&r.message.stamps)).map(|r| r.message.id.clone()).collect();
        let terminate = args.get("terminate").cloned().unwrap_or(Value::Bool(false));
        let mut revoke_args = Map::new();
        revoke_args.insert("terminate".into(), terminate);
        if let Some(s) = args.get("signal") {
            revoke_args.insert("signal".into(), s.clone());
        }
        self.revoke(ids, &revoke_args);
        ok(format!("headers {} flagged as revoked", Value::Object(wanted)))
    }

    fn set_rate_limit(&mut self, args: &Map<String, Value>) -> Value {
        let name = args.get("task_name").and_then(Value::as_str).unwrap_or("");
        let rate = args.get("rate_limit").cloned().unwrap_or(Value::Null);
        let disabled = matches!(&rate, Value::Null) || rate.as_str() == Some("") || rate.as_f64() == Some(0.0);
        if !disabled && super::parse_rate(&rate).is_none() {
            return nok(format!("Invalid rate limit string: ValueError({rate})"));
        }
        let Some(options) = self.tasks.get_mut(name) else {
            error!("Rate limit attempt for unknown task {name}");
            return nok("unknown task");
        };
        if disabled {
            options.rate_limit = None;
            info!("Rate limits disabled for tasks of type {name}");
            return ok("rate limit disabled successfully");
        }
        options.rate_limit = Some(rate.clone());
        info!("New rate limit for tasks of type {name}: {rate}.");
        ok("new rate limit set successfully")
    }

    fn set_time_limit(&mut self, args: &Map<String, Value>) -> Value {
        let name = args.get("task_name").and_then(Value::as_str).unwrap_or("");
        let Some(options) = self.tasks.get_mut(name) else {
            error!("Change time limit attempt for unknown task {name}");
            return nok("unknown task");
        };
        options.soft_time_limit = args.get("soft").and_then(Value::as_f64);
        options.time_limit = args.get("hard").and_then(Value::as_f64);
        info!(
            "New time limits for tasks of type {name}: soft={:?} hard={:?}",
            options.soft_time_limit, options.time_limit
        );
        ok("time limits set successfully")
    }

    fn active_infos(&self) -> Vec<Value> {
        self.active
            .iter()
            .filter_map(|(index, job)| job.task().map(|r| r.info(&self.settings.hostname, self.pool.pid(*index))))
            .collect()
    }

    fn reserved_infos(&self) -> Vec<Value> {
        self.reserved_requests().map(|r| r.info(&self.settings.hostname, None)).collect()
    }

    fn scheduled_infos(&self) -> Vec<Value> {
        self.eta
            .iter()
            .map(|(due, r)| {
                json!({
                    "eta": due.to_rfc3339(),
                    "priority": r.delivery.properties.get("priority").cloned().unwrap_or(Value::from(0)),
                    "request": r.info(&self.settings.hostname, None),
                })
            })
            .collect()
    }

    fn query_task(&self, ids: Vec<String>) -> Value {
        let mut out = Map::new();
        for (index, job) in &self.active {
            if let Some(r) = job.task().filter(|r| ids.contains(&r.message.id)) {
                out.insert(
                    r.message.id.clone(),
                    json!(["active", r.info(&self.settings.hostname, self.pool.pid(*index))]),
                );
            }
        }
        for r in self.reserved_requests() {
            if ids.contains(&r.message.id) {
                out.insert(r.message.id.clone(), json!(["reserved", r.info(&self.settings.hostname, None)]));
            }
        }
        for (_, r) in self.eta.iter() {
            if ids.contains(&r.message.id) {
                out.insert(r.message.id.clone(), json!(["scheduled", r.info(&self.settings.hostname, None)]));
            }
        }
        Value::Object(out)
    }

    fn registered(&self) -> Value {
        let mut names: Vec<String> = self
            .tasks
            .iter()
            .filter(|(n, _)| !n.starts_with("celery."))
            .map(|(n, o)| match &o.rate_limit {
                Some(Value::String(r)) => format!("{n} [rate_limit={r}]"),
                Some(Value::Number(r)) => format!("{n} [rate_limit={r}]"),
                _ => n.clone(),
            })
            .collect();
        names.sort();
        json!(names)
    }

    fn stats(&self) -> Value {
        let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).ok();
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        let mut stats = json!({
            "total": self.totals,
            "pid": std::process::id(),
            "clock": self.clock.to_string(),
            "uptime": self.started.elapsed().as_secs(),
            "pool": {
                "implementation": "celeriac:prefork",
                "max-concurrency": self.concurrency,
                "processes": self.pool.pids(),
                "max-tasks-per-child": Value::Null,
                "put-guarded-by-semaphore": false,
                "timeouts": [self.settings.soft_time_limit.unwrap_or(0.0), self.settings.time_limit.unwrap_or(0.0)],
                "writes": {},
            },
            "broker": self.broker_info,
            "prefetch_count": *self.prefetch.borrow(),
            "rusage": usage.map(|u| json!({
                "utime": secs(u.user_time()),
                "stime": secs(u.system_time()),
                "maxrss": u.max_rss(),
                "minflt": u.minor_page_faults(),
                "majflt": u.major_page_faults(),
                "nvcsw": u.voluntary_context_switches(),
                "nivcsw": u.involuntary_context_switches(),
            })),
        });
        if let Some(a) = &self.autoscaler {
            // `WorkerComponent.info` of the autoscaler bootstep.
            stats["autoscaler"] =
                json!({"max": a.max, "min": a.min, "current": self.pool.serving(), "qty": self.reserved_count()});
        }
        stats
    }

    /// `Queue.as_dict(recurse=True)` for each queue consumed.
    fn active_queues(&self) -> Value {
        let queues: Vec<Value> = self
            .queues
            .borrow()
            .iter()
            .map(|q| {
                json!({
                    "name": q.name,
                    "exchange": {"name": q.exchange, "type": q.exchange_type, "durable": q.exchange_durable,
                                 "auto_delete": q.exchange_auto_delete, "arguments": q.exchange_arguments,
                                 "delivery_mode": Value::Null, "passive": false, "no_declare": false},
                    "routing_key": q.routing_key,
                    "queue_arguments": q.queue_arguments,
                    "binding_arguments": q.binding_arguments,
                    "consumer_arguments": Value::Null,
                    "durable": q.durable,
                    "exclusive": q.exclusive,
                    "auto_delete": q.auto_delete,
                    "no_ack": false,
                    "alias": Value::Null,
                    "bindings": [],
                    "no_declare": Value::Null,
                    "expires": Value::Null,
                    "message_ttl": Value::Null,
                    "max_length": Value::Null,
                    "max_length_bytes": Value::Null,
                    "max_priority": q.max_priority,
                })
            })
            .collect();
        Value::Array(queues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names() {
        assert_eq!(signum(None), Some(libc::SIGTERM));
        assert_eq!(signum(Some("KILL")), Some(libc::SIGKILL));
        assert_eq!(signum(Some("SIGUSR1")), Some(libc::SIGUSR1));
        assert_eq!(signum(Some("9")), Some(9));
        assert_eq!(signum(Some("NOPE")), None);
        assert_eq!(py_set(&["a".into(), "b".into()]), "{'a', 'b'}");
    }
}
