"""The peer that bench/serving.py measures us against: LitServe serving the same MiniLM variant.

    .venv/bin/python bench/litserve_peer.py --port 8100 [--variant int8|fp32] [--max-batch-size 32]
        [--batch-timeout-ms 5] [--no-compile]

LitServe (PyPI ``litserve``) with its own dynamic batching (``max_batch_size``, ``batch_timeout``),
one CPU inference worker, on 127.0.0.1. The model is built by our library exactly as the default
config builds the served variant (``dynamic-int8`` through ``torch.compile``, or FP32 eager), so
the comparison is of the serving machinery alone. ``POST /predict {"input": "a sentence"}``
returns ``{"embedding": [...]}`` (L2-normalised, as our /v1/embed does by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402

import litserve as ls  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class EmbedAPI(ls.LitAPI):
    def __init__(self, variant: str, compile: bool, threads: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.variant, self.compile, self.threads = variant, compile, threads

    def setup(self, device) -> None:
        from quantization.internals.compiled import Settled, compile_module, warm_up
        from quantization.models import load_task_model
        from quantization.texts import eval_texts
        from quantization.pipeline import quantize_model

        torch.set_num_threads(self.threads)
        self.tm = load_task_model("minilm")
        module = self.tm.module if self.variant == "fp32" else quantize_model(self.tm, "dynamic-int8").module
        if self.compile:
            module = compile_module(module, probe=lambda m: self.tm.run(m, eval_texts()[:2]))
        self.module = module
        warm_up(self._embed, eval_texts()[:4])
        if self.compile:
            self.module = Settled(self.module)  # as the service serves it

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tm.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        return F.normalize(self.module(**batch).float(), dim=-1)

    def decode_request(self, request: dict) -> str:
        return request["input"]

    def predict(self, texts: list[str]) -> list[list[float]]:
        return self._embed(list(texts)).tolist()

    def encode_response(self, output: list[float]) -> dict:
        return {"embedding": output}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--variant", choices=["int8", "fp32"], default="int8")
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-timeout-ms", type=float, default=5.0)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    api = EmbedAPI(args.variant, compile=args.variant == "int8" and not args.no_compile, threads=args.threads,
                   max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_ms / 1000.0)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
