#!/usr/bin/env python3
"""BERT-large (or BERT-base) in PyTorch + Hugging Face transformers behind Verdict's HTTP API.

The peer an ML engineer would deploy instead of Verdict: `BertForSequenceClassification` with the
standard BERT-large shape (24 x 1024, 16 heads, 4096) and seeded random weights (latency does not
depend on their values), the same WordPiece tokenizer as Verdict's `bert-large` server (MiniLM's
`tokenizer.json`, uncased BERT vocabulary), answering `POST /v1/classify` and `POST /predict` with
the same JSON as `verdict-serve`, so `verdict-bench` measures both the same way. Requests are
batched dynamically like Text Embeddings Inference does: a worker thread takes whatever is queued
(up to --max-batch rows, waiting at most --max-wait-ms for more once it has one) and runs one padded
forward under `torch.inference_mode()`.

    python3 scripts/torch_bert_server.py --tokenizer ~/.cache/verdict/models/<minilm>/tokenizer.json \
        --shape large --port 18190 [--threads 2]

Needs torch, transformers and tokenizers (`pip install torch transformers`; see
../shared/docs/references.md). `scripts/bench_vs_bert.sh` starts it when TORCH_PYTHON names a
Python that has them.
"""

import argparse
import json
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SHAPES = {
    "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
LABELS = ["negative", "positive"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a BERT WordPiece tokenizer.json")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="large")
    ap.add_argument("--port", type=int, default=18190)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all cores)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype",
        choices=["f32", "bf16", "int8"],
        default="f32",
        help="bf16: the model's weights and activations in bfloat16 (oneDNN's AVX512-BF16 / AMX kernels); "
        "int8: every Linear dynamically quantized (torch.ao.quantization.quantize_dynamic: int8 weights "
        "per channel, activations quantized per call; FBGEMM's VNNI kernels)",
    )
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = BertConfig(vocab_size=30522, num_labels=len(LABELS), **SHAPES[args.shape])
    model = BertForSequenceClassification(config).eval()
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif args.dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    tokenizer = Tokenizer.from_file(args.tokenizer)
    tokenizer.enable_truncation(max_length=512)
    tokenizer.no_padding()

    jobs = queue.Queue()

    def worker():
        while True:
            batch = [jobs.get()]
            deadline = time.monotonic() + args.max_wait_ms / 1000.0
            while len(batch) < args.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(jobs.get(timeout=left) if left > 0 else jobs.get_nowait())
                except queue.Empty:
                    break
            texts = [t for job in batch for t in job["texts"]]
            try:
                encs = tokenizer.encode_batch(texts)
                width = max(len(e.ids) for e in encs)
                ids = torch.zeros((len(encs), width), dtype=torch.long)
                mask = torch.zeros((len(encs), width), dtype=torch.long)
                for i, e in enumerate(encs):
                    ids[i, : len(e.ids)] = torch.tensor(e.ids)
                    mask[i, : len(e.ids)] = 1
                with torch.inference_mode():
                    logits = model(input_ids=ids, attention_mask=mask).logits.float()
                    probs = torch.softmax(logits, dim=-1).tolist()
                start = 0
                for job in batch:
                    job["result"] = probs[start : start + len(job["texts"])]
                    start += len(job["texts"])
            except Exception as e:  # answered as a 500, the server keeps serving
                for job in batch:
                    job["error"] = str(e)
            for job in batch:
                job["done"].set()

    threading.Thread(target=worker, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def reply(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/ready", "/health"):
                self.reply(200, {"ready": True, "model": f"torch bert-{args.shape} {args.dtype} (random, seed {args.seed})"})
            else:
                self.reply(404, {"error": {"code": "not_found", "message": self.path}})

        def do_POST(self):
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                inputs = req["inputs"]
                inputs = inputs if isinstance(inputs, list) else [inputs]
                texts = [i if isinstance(i, str) else i["sentence"] for i in inputs]
            except (ValueError, KeyError, TypeError) as e:
                self.reply(400, {"error": {"code": "bad_request", "message": str(e)}})
                return
            job = {"texts": texts, "done": threading.Event()}
            jobs.put(job)
            job["done"].wait()
            if "error" in job:
                self.reply(500, {"error": {"code": "internal", "message": job["error"]}})
                return
            results = [
                {"label": LABELS[max(range(len(p)), key=p.__getitem__)], "probabilities": dict(zip(LABELS, p))}
                for p in job["result"]
            ]
            if self.path == "/predict":
                self.reply(200, [[{"label": l, "score": s} for l, s in r["probabilities"].items()] for r in results])
            else:
                self.reply(200, {"task": req.get("task", "mr"), "results": results})

    ThreadingHTTPServer.daemon_threads = True
    # http.server listens with a backlog of 5: 16 clients opening a connection per request
    # overflowed it (3 resets in 100 requests in the first run, docs/benchmarks.md).
    ThreadingHTTPServer.request_queue_size = 256
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
