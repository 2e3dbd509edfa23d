#!/usr/bin/env python3
"""Client side of load-tests/cluster.sh (stdlib only). The shell script starts and stops every
process; this file only talks HTTP to the nodes, reads/writes the shared SQLite file and merges
oha's per-request CSV. Subcommands:

  setup WORK DATA_DIR URL...        register users until every node homes one, make an admin;
                                 writes $WORK/state.json
  wait-cluster N URL...          until every URL counts N alive members (and agrees on the ring)
  ttfb STATE LOCAL_URL REMOTE_URL TURNS   streaming turns of one user through its home and another node
  kill STATE SURVIVOR_URL VICTIM_NAME VICTIM_PID   SIGKILL the victim, time detection and serve-again
  tokens STATE N                 print N access tokens of distinct setup users (one per line)
  oha-merge LABEL SECS COUNT_FILE CSV... merge oha CSV outputs: req/s, p50/p99, status codes
  mem STATE DATA_DIR URL PID N   RSS per idle cached session (N users inserted into SQLite, JWTs minted)
  handoff STATE TIER RPM SECS LABEL URL...   one new user homed on node-3, on TIER (RPM requests a
                                 minute), sends /v1 requests through every URL for SECS s while the
                                 shell moves its home; admitted vs what the bucket allows
"""
import base64
import hashlib
import hmac
import http.client
import json
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import uuid

PASSWORD = "cluster-bench-password"


def split(url):
    u = urllib.parse.urlparse(url)
    return u.hostname, u.port


def call(url, method, path, body=None, token=None, timeout=10.0):
    """One request on a fresh connection: (status, parsed JSON or text)."""
    host, port = split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = "Bearer " + token
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")
    finally:
        conn.close()


def ok(status, body, what):
    if status // 100 != 2:
        raise SystemExit(f"{what}: HTTP {status}: {body}")
    return body


def pct(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def register(url, email):
    st, b = call(url, "POST", "/api/v1/auth/register", {"email": email, "password": PASSWORD})
    ok(st, b, "register " + email)
    return b["user"]["id"], b["access_token"]


def login(url, email):
    st, b = call(url, "POST", "/api/v1/auth/login", {"email": email, "password": PASSWORD})
    return ok(st, b, "login " + email)["access_token"]


def home_of(url, admin, user):
    st, b = call(url, "GET", f"/api/v1/admin/cluster?user={user}", token=admin)
    return ok(st, b, "admin/cluster")["user"]["home"]


def members(url, admin, timeout=2.0):
    st, b = call(url, "GET", "/api/v1/admin/cluster", token=admin, timeout=timeout)
    ok(st, b, "admin/cluster")
    return b


# ---------------------------------------------------------------------------------------- setup
def cmd_setup(work, data_dir, *urls):
    url = urls[0]
    admin_id, _ = register(url, "admin@bench.example")
    db = sqlite3.connect(os.path.join(data_dir, "chorus.db"), timeout=10)
    cols = [r[1] for r in db.execute("PRAGMA table_info(users)")]
    assert "role" in cols and "id" in cols, cols
    db.execute("UPDATE users SET role='admin' WHERE id=?", (admin_id,))
    db.commit()
    db.close()
    admin = login(url, "admin@bench.example")
    users = []  # {id, email, token, home}
    homes = {}
    i = 0
    while True:
        email = f"user{i}@bench.example"
        uid, tok = register(urls[i % len(urls)], email)
        users.append({"id": uid, "email": email, "token": tok, "home": home_of(url, admin, uid)})
        homes.setdefault(users[-1]["home"], []).append(len(users) - 1)
        i += 1
        if (len(homes) >= len(urls) and i >= 6) or i >= 60:
            break
    # Each node's view must agree on every home.
    for u in urls:
        for x in users:
            h = home_of(u, admin, x["id"])
            if h != x["home"]:
                raise SystemExit(f"{u} places {x['id']} on {h}, {url} on {x['home']}")
    state = {"admin": admin, "admin_id": admin_id, "users": users}
    with open(os.path.join(work, "state.json"), "w") as f:
        json.dump(state, f)
    print(f"registered {len(users)} users + 1 admin; homes: "
          + ", ".join(f"{h}: {len(v)}" for h, v in sorted(homes.items())))


def load(state_path):
    with open(state_path) as f:
        return json.load(f)


def cmd_wait_cluster(n, *urls, deadline=60.0, state_path=None):
    """Waits until every node counts n alive members with one ring digest and is ready (joined).
    Needs an admin for the digests: reads $STATE if set, else only checks /readyz."""
    n = int(n)
    admin = load(state_path)["admin"] if state_path else None
    end = time.time() + deadline
    last = None
    while time.time() < end:
        try:
            if admin:
                views = [members(u, admin) for u in urls]
                alive = [sum(1 for m in v["members"] if m["state"] == "alive") for v in views]
                digests = {v["ring"]["digest"] for v in views}
                last = (alive, len(digests))
                ready = all(call(u, "GET", "/readyz", timeout=2)[0] == 200 for u in urls)
                if all(a == n for a in alive) and len(digests) == 1 and ready:
                    return True
            else:
                texts = []
                statuses = []
                for u in urls:
                    st, b = call(u, "GET", "/readyz", timeout=2)
                    texts.append(json.dumps(b))
                    statuses.append(st)
                last = texts
                if all(f"{n} members" in t for t in texts) and all(s == 200 for s in statuses):
                    return True
        except (OSError, SystemExit, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    raise SystemExit(f"cluster did not converge on {n} members within {deadline:.0f}s: {last}")


# ----------------------------------------------------------------------------------------- ttfb
def stream_turn(url, token, thread, model):
    """One streaming turn on a raw socket (http.client's line reader costs ~200 µs an event, more
    than the server): (ttfb to the first delta, first delta → `done`, deltas)."""
    host, port = split(url)
    body = json.dumps({"content": "say something long", "model": model, "stream": True}).encode()
    req = (f"POST /api/v1/threads/{thread}/messages HTTP/1.1\r\nHost: {host}\r\n"
           f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
           f"Accept: text/event-stream\r\nConnection: close\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        chunks, first, end, seen = [], None, None, b""
        t0 = time.perf_counter()
        sock.sendall(req)
        while True:
            d = sock.recv(262144)
            if not d:
                break
            now = time.perf_counter()
            chunks.append(d)
            tail = seen[-64:] + d
            if first is None and b"event:delta" in tail:
                first = now
            seen = tail
            if b"event:done" in tail:
                end = now
                break
        data = b"".join(chunks)
    finally:
        sock.close()
    if not data.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"turn: {data[:300]!r}")
    if first is None or end is None or b"event:message_complete" not in data:
        raise RuntimeError(f"turn ended without delta/message_complete/done: {data[-300:]!r}")
    return first - t0, end - first, data.count(b"event:delta")


def cmd_ttfb(state_path, local_url, remote_url, turns, model="bench-lorem"):
    st = load(state_path)
    turns = int(turns)
    # The user homed on the local node.
    local_name = members(local_url, st["admin"])["node"]
    user = next(u for u in st["users"] if u["home"] == local_name)
    remote_name = members(remote_url, st["admin"])["node"]
    print(f"user …{user['id'][-8:]} homed on {local_name}; local = through {local_name}, "
          f"remote = through {remote_name}; {turns} turns each (+10 warm-up), model {model}")
    # Local and remote turns alternate, so a change in the machine's load hits both alike.
    # A fresh thread per turn: the history (and so the prompt) stays the same size.
    targets = (("local", local_url), ("remote", remote_url))
    threads = {}
    for label, url in targets:
        threads[label] = []
        for _ in range(turns + 10):
            s, b = call(url, "POST", "/api/v1/threads", {}, token=user["token"])
            b = ok(s, b, "create thread")
            threads[label].append((b.get("thread") or b)["id"])
    results = {label: [] for label, _ in targets}
    errors = {label: 0 for label, _ in targets}
    for i in range(turns + 10):
        for label, url in targets:
            try:
                r = stream_turn(url, user["token"], threads[label][i], model)
            except (RuntimeError, OSError) as e:
                errors[label] += 1
                if errors[label] <= 3:
                    print(f"  {label} turn {i}: {e}")
                continue
            if i >= 10:
                results[label].append(r)
    rows = {}
    for label, out in results.items():
        ttfb = [o[0] * 1000 for o in out]
        per_event = [o[1] / max(o[2], 1) * 1e6 for o in out]
        stream_ms = [o[1] * 1000 for o in out]
        deltas = sorted({o[2] for o in out})
        rows[label] = (pct(ttfb, .5), pct(ttfb, .99), pct(per_event, .5), pct(per_event, .99),
                       pct(stream_ms, .5))
        print(f"{label:6s} n={len(out):3d} errors={errors[label]}  TTFB p50 {rows[label][0]:7.3f} ms"
              f"  p99 {rows[label][1]:7.3f} ms   per event p50 {rows[label][2]:6.1f} µs"
              f"  p99 {rows[label][3]:6.1f} µs   (stream p50 {rows[label][4]:.2f} ms,"
              f" deltas/turn {deltas})")
    if "local" in rows and "remote" in rows:
        l, r = rows["local"], rows["remote"]
        print(f"remote − local: TTFB p50 {r[0] - l[0]:+.3f} ms  p99 {r[1] - l[1]:+.3f} ms;"
              f"  per event p50 {r[2] - l[2]:+.1f} µs  p99 {r[3] - l[3]:+.1f} µs")


# ----------------------------------------------------------------------------------------- kill
def cmd_kill(state_path, survivor_url, victim_name, victim_pid, run_no="1"):
    st = load(state_path)
    admin = st["admin"]
    victim_pid = int(victim_pid)
    user = next(u for u in st["users"] if home_of(survivor_url, admin, u["id"]) == victim_name)
    survivor = members(survivor_url, admin)["node"]
    # Warm the user's session on the victim.
    s, b = call(survivor_url, "GET", "/api/v1/me/usage", token=user["token"])
    ok(s, b, "warm-up usage")
    lock = threading.Lock()
    res = {"detect": None, "serve": None, "fails": {}, "rehome": None, "new_home": None,
           "attempts": 0}
    stop = threading.Event()

    def probe(t_kill):
        try:
            s, b = call(survivor_url, "GET", "/api/v1/me/usage", token=user["token"], timeout=15)
            key = str(s)
        except (OSError, http.client.HTTPException) as e:
            s, key = None, type(e).__name__
        done = time.perf_counter() - t_kill
        with lock:
            res["attempts"] += 1
            if s == 200:
                if res["serve"] is None or done < res["serve"]:
                    res["serve"] = done
                stop.set() if res["detect"] is not None else None
            else:
                res["fails"][key] = res["fails"].get(key, 0) + 1

    def watch(t_kill):
        while time.perf_counter() - t_kill < 30:
            try:
                v = members(survivor_url, admin, timeout=1)
                names = [m["name"] for m in v["members"]]
                if res["rehome"] is None:
                    h = home_of(survivor_url, admin, user["id"])
                    if h != victim_name:
                        res["rehome"], res["new_home"] = time.perf_counter() - t_kill, h
                if victim_name not in names and res["detect"] is None:
                    res["detect"] = time.perf_counter() - t_kill
                    res["states_at_detect"] = [(m["name"], m["state"]) for m in v["members"]]
                    if res["serve"] is not None:
                        stop.set()
                    return
            except (OSError, SystemExit, http.client.HTTPException):
                pass
            time.sleep(0.02)

    t_kill = time.perf_counter()
    os.kill(victim_pid, signal.SIGKILL)
    w = threading.Thread(target=watch, args=(t_kill,), daemon=True)
    w.start()
    probes = []
    while not stop.is_set() and time.perf_counter() - t_kill < 30:
        if sum(p.is_alive() for p in probes) < 300:
            p = threading.Thread(target=probe, args=(t_kill,), daemon=True)
            p.start()
            probes.append(p)
        time.sleep(0.02)
        if res["serve"] is not None and res["detect"] is not None:
            break
    w.join(timeout=5)
    for p in probes:
        p.join(timeout=16)
    fmt = lambda v: "n/a" if v is None else f"{v * 1000:.0f} ms"
    print(f"run {run_no}: SIGKILL {victim_name} → gone from {survivor}'s members "
          f"after {fmt(res['detect'])}, user …{user['id'][-8:]} re-homed to {res['new_home']} "
          f"after {fmt(res['rehome'])}, served again after {fmt(res['serve'])}  "
          f"({res['attempts']} probes every 20 ms, failed: {res['fails'] or 'none'})")
    with open(os.path.join(os.path.dirname(state_path), "kill.jsonl"), "a") as f:
        f.write(json.dumps({"detect": res["detect"], "serve": res["serve"],
                            "rehome": res["rehome"]}) + "\n")


def cmd_kill_summary(state_path):
    rows = [json.loads(l) for l in open(os.path.join(os.path.dirname(state_path), "kill.jsonl"))]
    for k in ("detect", "rehome", "serve"):
        v = [r[k] * 1000 for r in rows if r[k] is not None]
        if v:
            print(f"{k:7s} over {len(v)} runs: min {min(v):.0f} ms  median {sorted(v)[len(v)//2]:.0f} ms"
                  f"  max {max(v):.0f} ms")


# --------------------------------------------------------------------------------------- tokens
def cmd_tokens(state_path, n):
    st = load(state_path)
    for u in st["users"][: int(n)]:
        print(u["token"])


def cmd_oha_merge(label, secs, count_file, *csvs):
    lat, codes, errors = [], {}, 0
    for path in csvs:
        with open(path) as f:
            header = f.readline().strip().split(",")
            idx_d = header.index("request-duration") if "request-duration" in header else None
            idx_s = header.index("status") if "status" in header else None
            for line in f:
                p = line.strip().split(",")
                if idx_d is None or len(p) <= idx_d:
                    continue
                try:
                    lat.append(float(p[idx_d]) * 1000)
                except ValueError:
                    errors += 1
                    continue
                c = p[idx_s] if idx_s is not None else "?"
                codes[c] = codes.get(c, 0) + 1
    secs = float(secs)
    with open(count_file, "w") as f:
        f.write(str(len(lat)))
    print(f"{label:28s} {len(lat) / secs:8.0f} req/s  p50 {pct(lat, .5):7.3f} ms  p99 {pct(lat, .99):7.3f} ms"
          f"  ({len(lat)} requests, status {codes}{', unparsed %d' % errors if errors else ''})")


# ------------------------------------------------------------------------------------------ mem
def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])


def cmd_mem(state_path, data_dir, url, pid, n, secret):
    st = load(state_path)
    n = int(n)
    template = st["users"][0]
    header, claims, _ = template["token"].split(".")
    header, claims = json.loads(b64d(header)), json.loads(b64d(claims))
    db = sqlite3.connect(os.path.join(data_dir, "chorus.db"), timeout=30)
    db.row_factory = sqlite3.Row
    row = dict(db.execute("SELECT * FROM users WHERE id=?", (template["id"],)).fetchone())
    now = int(time.time())
    ids = []
    for i in range(n + 50):
        uid = str(uuid.uuid4())
        r = dict(row, id=uid, email=f"mem{i}-{uid[:8]}@bench.example")
        db.execute(f"INSERT INTO users ({','.join(r)}) VALUES ({','.join('?' * len(r))})",
                   list(r.values()))
        ids.append(uid)
    db.commit()
    db.close()

    def mint(uid):
        c = dict(claims, sub=uid, iat=now, exp=now + 3600)
        signing = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + \
            b64(json.dumps(c, separators=(",", ":")).encode())
        sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
        return signing + "." + b64(sig)

    host, port = split(url)

    def touch(batch, fails):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for uid in batch:
            conn.request("GET", "/api/v1/me/usage", headers={"authorization": "Bearer " + mint(uid)})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                fails.append((r.status, body[:200]))
        conn.close()

    def run(batch):
        fails, ts = [], []
        for k in range(4):
            t = threading.Thread(target=touch, args=(batch[k::4], fails))
            t.start()
            ts.append(t)
        for t in ts:
            t.join()
        return fails

    def sessions():
        s, b = call(url, "GET", "/readyz")
        return b.get("sessions") if isinstance(b, dict) else None

    # Warm-up: 50 users (allocator arenas, pools), not counted.
    fails = run(ids[:50])
    time.sleep(1)
    before, s_before = rss(pid), sessions()
    t = time.perf_counter()
    fails += run(ids[50:])
    took = time.perf_counter() - t
    time.sleep(2)
    after, s_after = rss(pid), sessions()
    print(f"{n} users, one GET /api/v1/me/usage each ({took:.1f} s): VmRSS {before} → {after} kB, "
          f"live sessions {s_before} → {s_after}; {(after - before) * 1024 / n / 1000:.1f} kB "
          f"({(after - before) / n:.2f} KiB) per idle cached session; failed requests: {len(fails)}"
          + (f" e.g. {fails[0]}" if fails else ""))


def cmd_handoff(state_path, tier, rpm, secs, label, *urls):
    st = load(state_path)
    admin = st["admin"]
    rpm, secs = int(rpm), float(secs)
    # A fresh user (a full bucket) homed on node-3, on the limited tier.
    for i in range(200):
        uid, tok = register(urls[0], f"handoff-{uuid.uuid4().hex[:12]}@bench.example")
        if home_of(urls[0], admin, uid) == "node-3":
            break
    else:
        raise SystemExit("no user homed on node-3 in 200 tries")
    st_, b = call(urls[0], "PATCH", f"/api/v1/admin/users/{uid}", {"tier": tier}, token=admin)
    ok(st_, b, "set tier")
    print(f"READY", flush=True)
    body = {"model": "mock-echo", "messages": [{"role": "user", "content": "count me"}]}
    lock = threading.Lock()
    counts = {"admitted": 0, "limited": 0, "failed": {}}
    t0 = time.perf_counter()

    def worker(k):
        i = k
        while time.perf_counter() - t0 < secs:
            url = urls[i % len(urls)]
            i += 1
            try:
                s, _ = call(url, "POST", "/v1/chat/completions", body, token=tok, timeout=10)
                key = s
            except (OSError, http.client.HTTPException) as e:
                s, key = None, type(e).__name__
            with lock:
                if s == 200:
                    counts["admitted"] += 1
                elif s == 429:
                    counts["limited"] += 1
                else:
                    counts["failed"][str(key)] = counts["failed"].get(str(key), 0) + 1
            if s != 200 and s != 429:
                time.sleep(0.02)  # a node that is down: don't spin on refused connections

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    allowed = rpm + rpm / 60.0 * took  # a full bucket plus its refill over the run
    over = counts["admitted"] - allowed
    print(f"{label}: {took:.1f} s, admitted {counts['admitted']} of at most {allowed:.0f} "
          f"({rpm}/min, full at the start) → over-admitted {max(over, 0):.0f} "
          f"({max(over, 0) / rpm * 100:.0f}% of one minute's limit); limited {counts['limited']}, "
          f"failed {counts['failed'] or 'none'}")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "setup":
        cmd_setup(*args)
    elif cmd == "wait-cluster":
        cmd_wait_cluster(args[0], *args[1:], state_path=os.environ.get("STATE"))
    elif cmd == "ttfb":
        cmd_ttfb(*args)
    elif cmd == "kill":
        cmd_kill(*args)
    elif cmd == "kill-summary":
        cmd_kill_summary(*args)
    elif cmd == "tokens":
        cmd_tokens(*args)
    elif cmd == "oha-merge":
        cmd_oha_merge(*args)
    elif cmd == "mem":
        cmd_mem(*args)
    elif cmd == "handoff":
        cmd_handoff(*args)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
