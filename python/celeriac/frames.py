"""Frames between the Rust supervisor and the Python processes (zygote, pool children).

Every frame is ``u32 length (big endian) | u8 kind | payload``, where length counts the kind
byte and the payload. The kinds mirror ``src/pool/frame.rs``; keep both in step.
"""

import marshal
import struct

# supervisor -> zygote
FORK = 1  # payload: json {"index": n}; one fd (the child's end of its socketpair) rides along
SAVE_STATE = 6  # payload: json {"revoked": [...], "clock": n}; write the --statedb file
WORKER_SIGNAL = 7  # payload: json {"signal": "worker_ready" | "worker_shutting_down" | "worker_shutdown", ...}
TASK_RECEIVED = 12  # supervisor -> zygote, payload as TASK: send `task_received` (only when connected)
OPTIONS = 13  # supervisor -> zygote, first frame, read by celeriac-zygote's Rust main: json options
RECORD = 9  # supervisor -> zygote, payload: json outcome record (as MARK_FAILURE) when no child is left
SIGNAL_SENT = 8  # zygote -> supervisor, payload: json {"signal": name}: its handlers have run
# zygote -> supervisor
BOOTSTRAP = 2  # payload: json, the app's configuration and task registry
FORKED = 3  # payload: json {"index": n, "pid": p}
EXITED = 4  # payload: json {"pid": p, "exitcode": c, "signal": s}
FATAL = 5  # payload: utf-8 text, one line: why the app could not be loaded
# supervisor -> child
TASK = 10  # payload: see loads_task
MARK_FAILURE = 11  # payload: json, an outcome no task run produced (unregistered task, ...)
# child -> supervisor
READY = 20  # payload: json {"pid": p}
DONE = 21  # payload: json {"outcome": ..., "runtime": s, "requeue": bool}
SUCCEEDED = 22  # DONE for the common case, no JSON: f64 runtime | u8 exiting | utf-8 result repr
# supervisor -> beat process (a child forked with FORK {"role": "beat", ...})
BEAT_LEAD = 30  # payload: json, the schedule state the last leader shared ({} if none): send due tasks
BEAT_FOLLOW = 31  # empty: another replica leads now; stop sending
# beat process -> supervisor
BEAT_STATE = 32  # payload: json {entry: {"last_run_at": iso, "total_run_count": n}} after sending

_HEADER = struct.Struct(">IB")
_U32 = struct.Struct(">I")
_SUCCEEDED = struct.Struct(">IBdB")  # frame header, then runtime and exiting


def pack(kind, payload=b""):
    return _HEADER.pack(len(payload) + 1, kind) + payload


def pack_succeeded(runtime, exiting, result):
    result = result.encode("utf-8", "replace")
    return _SUCCEEDED.pack(len(result) + 10, SUCCEEDED, runtime, exiting) + result


def read_frame_buffered(reader):
    """read_frame from a buffered reader (``sock.makefile("rb")``): one syscall for many frames."""
    head = reader.read(5)
    if len(head) < 5:
        return None
    length, kind = _HEADER.unpack(head)
    payload = reader.read(length - 1) if length > 1 else b""
    if len(payload) < length - 1:
        return None
    return kind, payload


def read_exact(sock, n):
    """Read exactly n bytes, or return None on EOF."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            return None
        got += r
    return bytes(buf)


def read_frame(sock):
    """Return (kind, payload), or None when the peer closed the socket."""
    head = read_exact(sock, 5)
    if head is None:
        return None
    length, kind = _HEADER.unpack(head)
    payload = read_exact(sock, length - 1) if length > 1 else b""
    if payload is None:
        return None
    return kind, payload


def loads_task(payload):
    """A TASK frame's payload -> ``(name, id, proto, content_type, content_encoding, headers,
    extras, body, decoded)``: what Celery's ``Request`` builds its request dict from, the raw
    body, and, for a small plain JSON body, what ``json.loads`` makes of it (else ``None``).

    Written by the supervisor (``ChildMeta::task_frame``) as ``M`` and one marshal tuple, or,
    where a header holds a kombu type marker (``{"__type__": "datetime", ...}``), as
    ``u32 length | JSON meta | body``, for kombu's decoder to turn the markers into objects."""
    if payload[:1] == b"M":
        return marshal.loads(memoryview(payload)[1:])
    from kombu.utils.json import loads

    (meta_len,) = _U32.unpack_from(payload, 0)
    meta = loads(payload[4:4 + meta_len])
    return (meta["name"], meta["id"], meta["proto"], meta["content_type"], meta["content_encoding"],
            meta["headers"], meta["extras"], payload[4 + meta_len:], None)
