"""Soak: thousands of mixed requests at high concurrency against ``python -m service``.

    .venv/bin/python bench/soak.py                      # 20000 requests at 32 and at 64 clients; writes RESULTS.md
    .venv/bin/python bench/soak.py --requests 3000 --concurrency 48 --no-write

Every request sends 1 to 3 sentences to /v1/embed or /v1/classify, on the default variant or pinned
to fp32, with its own X-Request-ID. Every answer must match its own input: the embedding must be
nearest (cosine) to the one the same server gave for that sentence in a batched reference request
before the soak, the top label within 0.05 of the reference's best probability. Any other status, a mismatch or a request
id that comes back changed counts as an error. Resident memory of the server process is sampled
after warm-up and at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse, asyncio, math, random, time  # noqa: E401,E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from bench.live import ServiceProcess  # noqa: E402
from bench.results import machine_summary, write_section  # noqa: E402
from quantization.texts import eval_texts  # noqa: E402

ROUTES = [("minilm", "/v1/embed"), ("intent", "/v1/classify")]
VARIANTS = [None, "fp32"]  # None: the model's default (int8 in the default config)


@dataclass
class SoakResult:
    requests: int
    concurrency: int
    seconds: float
    statuses: dict[int, int]
    mismatches: int
    errors: list[str]
    latencies: list[float] = field(repr=False)
    rss_start: int = 0
    rss_end: int = 0

    @property
    def unexpected(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + self.mismatches

    @property
    def rss_growth(self) -> int:
        return self.rss_end - self.rss_start

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else math.nan


async def references(client: httpx.AsyncClient, texts: list[str]) -> dict[tuple[str, str | None], list[Any]]:
    """What the server answers for each sentence, per route and variant, asked in one batched request."""
    refs = {}
    for model, path in ROUTES:
        for variant in VARIANTS:
            body = {"model": model, "inputs": texts, **({"variant": variant} if variant else {})}
            if path == "/v1/classify":
                body["top_k"] = 1000
            r = await client.post(path, json=body)
            r.raise_for_status()
            refs[(path, variant)] = results = r.json()["results"]
            if path == "/v1/embed":
                EMBEDDINGS[id(results)] = np.asarray([x["embedding"] for x in results], dtype=np.float32)
    return refs


def matches(path: str, got: dict[str, Any], refs: list[dict[str, Any]], i: int) -> bool:
    """The answer is the one for sentence i: nearest of all the references, and close to it.

    Not bit-equal: an int8 variant's output moves a little with the other inputs in its batch
    (per-token activation ranges re-round after float noise in attention): min cosine 0.9989 seen.
    """
    if path == "/v1/embed":
        sims = EMBEDDINGS[id(refs)] @ np.asarray(got["embedding"], dtype=np.float32)
        return bool(sims[i] >= 0.99 and sims[i] >= sims.max() - 0.002)
    best = refs[i]["labels"][0]["score"]
    score = {x["label"]: x["score"] for x in refs[i]["labels"]}
    return score.get(got["labels"][0]["label"], -1.0) >= best - 0.05


def describe(path: str, got: dict[str, Any], refs: list[dict[str, Any]], i: int) -> str:
    if path == "/v1/embed":
        sims = EMBEDDINGS[id(refs)] @ np.asarray(got["embedding"], dtype=np.float32)
        return f"cosine to its own {sims[i]:.5f}, nearest is {int(sims.argmax())} at {sims.max():.5f}"
    return f"got {got['labels'][0]}, reference {refs[i]['labels'][:2]}"


EMBEDDINGS: dict[int, np.ndarray] = {}  # id(reference results) -> their embeddings as one matrix


async def soak(url: str, texts: list[str], requests: int, concurrency: int, pid: int | None = None,
               seed: int = 0) -> SoakResult:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        refs = await references(client, texts)
        plan = []
        for n in range(requests):
            (model, path), variant = rng.choice(ROUTES), rng.choice(VARIANTS)
            idx = [rng.randrange(len(texts)) for _ in range(rng.randint(1, 3))]
            plan.append((n, model, path, variant, idx))
        statuses: dict[int, int] = {}
        errors: list[str] = []
        latencies: list[float] = []
        mismatches = 0
        next_job = iter(plan)

        async def worker() -> None:
            nonlocal mismatches
            for n, model, path, variant, idx in next_job:
                rid = f"soak-{seed}-{n}"
                body = {"model": model, "inputs": [texts[i] for i in idx], **({"variant": variant} if variant else {})}
                start = time.perf_counter()
                try:
                    r = await client.post(path, json=body, headers={"X-Request-ID": rid})
                except httpx.HTTPError as exc:
                    statuses[-1] = statuses.get(-1, 0) + 1
                    errors.append(f"{rid}: {exc!r}")
                    continue
                latencies.append(time.perf_counter() - start)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    errors.append(f"{rid}: {r.status_code} {r.text[:200]}")
                    continue
                results = r.json()["results"]
                ref = refs[(path, variant)]
                wrong = [describe(path, got, ref, i) for got, i in zip(results, idx) if not matches(path, got, ref, i)]
                if r.headers.get("X-Request-ID") != rid or len(results) != len(idx) or wrong:
                    mismatches += 1
                    errors.append(f"{rid}: {path} variant={variant} answer does not match its input: {wrong}")

        rss = lambda: psutil.Process(pid).memory_info().rss if pid else 0  # noqa: E731
        warm = SoakResult(0, concurrency, 0, {}, 0, [], [])
        next_job = iter(plan[: max(500, requests // 10)])  # warm-up: allocator pools, batch shapes
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        warm.rss_start = rss()
        statuses.clear(), errors.clear(), latencies.clear()
        mismatches = 0
        next_job = iter(plan)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return SoakResult(requests, concurrency, seconds, statuses, mismatches, errors, latencies,
                      rss_start=warm.rss_start, rss_end=rss())


def render(rows: list[SoakResult], started: str, ready_s: float, command: str) -> str:
    lines = [f"Measured {started} on {machine_summary()}, with `{command}`: `python -m service` on its default "
             f"config (ready after {ready_s:.0f} s), a warm-up of max(500, 10%) requests, then every request "
             f"sends 1-3 sentences to /v1/embed or /v1/classify, default variant (int8) or pinned fp32. Every answer is "
             f"checked against the same server's batched answer for its own sentences.", "",
             "| clients | requests | seconds | requests/s | p50 ms | p99 ms | unexpected errors | "
             "RSS after warm-up | RSS growth |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.concurrency} | {r.requests} | {r.seconds:.1f} | {r.requests / r.seconds:.0f} | "
                     f"{1000 * r.pct(0.5):.1f} | {1000 * r.pct(0.99):.1f} | {r.unexpected} | "
                     f"{r.rss_start / 2**20:.0f} MiB | {r.rss_growth / 2**20:+.1f} MiB |")
    lines += ["", "The test suite runs the same soak (3000 requests, 48 clients) and fails on any unexpected error or "
                  "an RSS growth of 128 MiB or more. `python -m service` limits glibc to 2 malloc arenas "
                  "(service/memory.py): with the default, RSS sat ~300 MB higher and kept creeping."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    service = ServiceProcess("--log-level", "warning")
    try:
        ready_s = service.wait_ready()
        rows = [asyncio.run(soak(service.url, eval_texts(), args.requests, c, service.proc.pid, seed=c))
                for c in args.concurrency]
    finally:
        service.stop()
    command = "bench/soak.py" + (f" --requests {args.requests}" if args.requests != 20000 else "") + (
        f" --concurrency {' '.join(map(str, args.concurrency))}" if args.concurrency != [32, 64] else "")
    table = render(rows, started, ready_s, command)
    print(table)
    for r in rows:
        for e in r.errors[:10]:
            print(e, file=sys.stderr)
    if not args.no_write:
        write_section("soak", table)
    return 1 if any(r.unexpected for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
