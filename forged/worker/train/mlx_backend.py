"""MLX back end: mlx-lm models and LoRA/DoRA layers, forged's own loop, PiSSA, QLoRA.

GGUF bases are read with ``mx.load`` straight into an mlx-lm llama built with
``rope_traditional=True`` (GGUF keeps q/k rows permuted, so the adapter's q/k rows are
in GGUF order: ``layout = "gguf"``). Q4_0/Q4_1/Q8_0 tensors stay quantized for QLoRA
(``quantized = true``) or are dequantized to float32; tensor types mx.load cannot read
are dequantized with the ``gguf`` package. HF directories load through mlx-lm.

Batches are bucketed by real token length (one example per row, each batch padded to
its longest row): mlx-lm's attention takes positions from the KV cache offset, so
per-example positions inside a packed row would need a custom attention; bucketing
keeps padding low without touching the model (documented in docs/training.md).

On Linux, MLX's CPU wheel links the reference BLAS; preloading OpenBLAS makes it ~10x
faster — see :func:`openblas_preload`.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from forged.common.backends import BackendError, openblas_preload  # noqa: F401 (re-exported)
from forged.common.config import TrainConfig
from forged.common.models import BaseModel, ModelError
from forged.worker.train.data import cut_at_stop, encode, score_windows, start_id, stop_hit
from forged.worker.train.models import load_tokenizer
from forged.worker.train.packing import IGNORE
from forged.worker.train.pissa import pissa_init, to_plain_lora

GGUF_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_ARCHS = {"llama", "mistral"}


def _gguf_name(k: str) -> str:
    parts = k.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{GGUF_NAMES[parts[0]]}.{parts[1]}"


def _read_gguf(path: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    try:
        return mx.load(str(path), return_metadata=True)
    except (ValueError, RuntimeError):
        pass
    # Tensor types mx.load cannot read: dequantize everything with the gguf package.
    import gguf

    reader = gguf.GGUFReader(str(path))
    weights = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = mx.array(np.asarray(arr, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist()))))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    return weights, meta


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, mx.array) else v


def load_gguf_model(path: Path, quantized: bool) -> tuple[nn.Module, dict[str, Any]]:
    from mlx_lm.models import llama

    weights, meta = _read_gguf(path)
    arch = str(meta.get("general.architecture"))
    if arch not in GGUF_ARCHS:
        raise ModelError(f"MLX back end reads llama-family GGUF only (this is {arch!r}): use backend = 'torch' "
                         "or a Hugging Face directory of the model")
    m = {k: _scalar(v) for k, v in meta.items() if k.startswith(arch + ".")}
    hidden = int(m[f"{arch}.embedding_length"])
    heads = int(m[f"{arch}.attention.head_count"])
    weights = {_gguf_name(k): v for k, v in weights.items() if not k.startswith("rope_freqs")}
    vocab = int(m.get(f"{arch}.vocab_size") or weights["model.embed_tokens.scales" if "model.embed_tokens.scales" in weights else "model.embed_tokens.weight"].shape[0])
    args = llama.ModelArgs(
        model_type="llama", hidden_size=hidden, num_hidden_layers=int(m[f"{arch}.block_count"]),
        intermediate_size=int(m[f"{arch}.feed_forward_length"]), num_attention_heads=heads,
        num_key_value_heads=int(m.get(f"{arch}.attention.head_count_kv", heads)),
        rms_norm_eps=float(m.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)), vocab_size=vocab,
        rope_theta=float(m.get(f"{arch}.rope.freq_base", 10000.0)), rope_traditional=True,
        max_position_embeddings=int(m.get(f"{arch}.context_length", 2048)),
        tie_word_embeddings="lm_head.weight" not in weights,
    )
    model = llama.Model(args)
    qbits: dict[str, int] = {}
    for k in weights:
        if k.endswith(".scales"):
            p = k[: -len(".scales")]
            w, s = weights[p + ".weight"], weights[k]
            in_dims = s.shape[-1] * 32
            qbits[p] = w.shape[-1] * 32 // in_dims
    if quantized and qbits:
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda p, _m: {"group_size": 32, "bits": qbits[p]} if p in qbits else False)
    else:
        for p, bits in qbits.items():
            weights[p + ".weight"] = mx.dequantize(weights[p + ".weight"], weights.pop(p + ".scales"),
                                                   weights.pop(p + ".biases"), group_size=32, bits=bits)
        weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model, {"layers": args.num_hidden_layers, "tied": args.tie_word_embeddings}


class MLXBackend:
    name = "mlx"
    batching = "bucket"

    def __init__(self, base: BaseModel, cfg: TrainConfig) -> None:
        self.base, self.cfg = base, cfg
        self.tok = load_tokenizer(base)
        self.start_id = start_id(self.tok)
        self.notes: list[str] = []
        if base.kind == "gguf":
            self.model, info = load_gguf_model(base.path, cfg.quantized)
            self.layout = "gguf"
        else:
            from mlx_lm.utils import load_model

            try:
                self.model, _ = load_model(base.path)
            except (ValueError, KeyError) as e:
                raise ModelError(f"mlx-lm cannot load {base.spec} ({base.architecture}): {str(e)[:200]} — "
                                 "try backend = 'torch'") from None
            if cfg.quantized:
                nn.quantize(self.model, group_size=64, bits=4)
            self.layout = "hf"
        self.model.freeze()
        self.opt: optim.Optimizer | None = None
        self.lora: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attr, lora layer)
        self.pissa0: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.adapter_info: dict[str, Any] = {}
        self._step = 0

    # ------------------------------------------------------------------ adapter

    def _keys(self, targets: list[str]) -> list[str]:
        layer = self.model.model.layers[0]
        keys = [n for n, m in layer.named_modules()
                if isinstance(m, nn.Linear | nn.QuantizedLinear) and n.rsplit(".", 1)[-1] in targets]
        found = {k.rsplit(".", 1)[-1] for k in keys}
        missing = [t for t in targets if t not in found]
        if missing:
            raise BackendError(f"target_modules {missing} not found in {self.base.spec} (its linear layers: {sorted(n for n, m in layer.named_modules() if isinstance(m, nn.Linear | nn.QuantizedLinear))})")
        return sorted(keys)

    def _apply_lora(self, rank: int, scale: float, dropout: float, keys: list[str], dora: bool) -> None:
        from mlx_lm.tuner.utils import linear_to_lora_layers

        linear_to_lora_layers(self.model, len(self.model.model.layers),
                              {"rank": rank, "scale": scale, "dropout": dropout, "keys": keys}, use_dora=dora)
        self.lora = []
        for layer in self.model.model.layers:
            for k in keys:
                parent_path, attr = k.rsplit(".", 1)
                parent = layer
                for part in parent_path.split("."):
                    parent = getattr(parent, part)
                self.lora.append((parent, attr, parent[attr]))

    def attach_adapter(self, cfg: TrainConfig, *, warm_start: Path | None, init_dir: Path) -> dict[str, Any]:
        mx.random.seed(cfg.seed)
        if warm_start is not None:
            conf = json.loads((Path(warm_start) / "adapter_config.json").read_text())
            lp = conf["lora_parameters"]
            dora = conf.get("fine_tune_type") == "dora"
            self._apply_lora(lp["rank"], lp["scale"], cfg.dropout, lp["keys"], dora)
            self.model.load_weights(str(Path(warm_start) / "adapters.safetensors"), strict=False)
            meta = json.loads((Path(warm_start) / "forged_meta.json").read_text())
            info = {"method": "lora", "rank": lp["rank"], "alpha": meta.get("alpha"), "scale": lp["scale"],
                    "rslora": meta.get("rslora"), "dora": dora, "warm_start": str(warm_start), "keys": lp["keys"]}
        else:
            if cfg.method == "pissa" and cfg.dora:
                raise BackendError("dora = true works with method = 'lora' only (a PiSSA+DoRA adapter cannot be "
                                   "converted to a plain LoRA on the original base)")
            scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
            keys = self._keys(list(cfg.target_modules))
            self._apply_lora(cfg.rank, scale, cfg.dropout, keys, cfg.dora)
            info = {"method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha, "scale": scale, "rslora": cfg.rslora,
                    "dora": cfg.dora, "keys": keys}
            if cfg.method == "pissa":
                self._pissa(cfg, scale, keys, init_dir)
        info["target_modules"] = list(cfg.target_modules)
        self.adapter_info = info
        self.opt = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=0.0)
        self.opt.init(self.model.trainable_parameters())
        self.model.train()
        return info

    def _pissa(self, cfg: TrainConfig, scale: float, keys: list[str], init_dir: Path) -> None:
        """Principal part → adapter, residual → base (re-quantized on a 4-bit base: QPiSSA).

        A0/B0 are stored in ``init_dir``; a resumed run reuses them, so its residual
        is identical even though the randomized SVD is not recomputed.
        """
        f = init_dir / "pissa_init.safetensors"
        stored = {k: np.array(v) for k, v in mx.load(str(f)).items()} if f.exists() else {}
        i = 0
        for li in range(len(self.model.model.layers)):
            for k in keys:
                parent, attr, lora = self.lora[i]
                i += 1
                name = f"model.layers.{li}.{k}"
                lin = lora.linear
                if isinstance(lin, nn.QuantizedLinear):
                    w = mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=lin.group_size, bits=lin.bits)
                else:
                    w = lin.weight
                w = np.array(w.astype(mx.float32))
                if name + ".lora_a" in stored:
                    a0, b0 = stored[name + ".lora_a"], stored[name + ".lora_b"]
                    res = w - scale * (a0 @ b0).T
                else:
                    a0, b0, res = pissa_init(w, cfg.rank, scale, cfg.pissa_niter, seed=cfg.seed + i)
                new = nn.Linear(w.shape[1], w.shape[0], bias=False)
                new.weight = mx.array(res)
                if isinstance(lin, nn.QuantizedLinear):
                    new = nn.QuantizedLinear.from_linear(new, lin.group_size, lin.bits)
                new.freeze()
                lora.linear = new
                lora.lora_a = mx.array(a0)
                lora.lora_b = mx.array(b0)
                self.pissa0[name] = (a0, b0)
        if not stored:
            init_dir.mkdir(parents=True, exist_ok=True)
            flat = {}
            for n, (a0, b0) in self.pissa0.items():
                flat[n + ".lora_a"], flat[n + ".lora_b"] = mx.array(a0), mx.array(b0)
            mx.save_safetensors(str(f), flat)
        mx.eval(self.model.parameters())

    # ------------------------------------------------------------------ training

    def _head(self, h: mx.array) -> mx.array:
        if self.model.args.tie_word_embeddings:
            return self.model.model.embed_tokens.as_linear(h)
        return self.model.lm_head(h)

    def _prep(self, batch: dict[str, Any]) -> tuple[mx.array, mx.array, mx.array, int]:
        ids = np.asarray(batch["input_ids"], dtype=np.int32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
        # Trim trailing all-padding columns (rows are right-padded; causal attention
        # keeps real tokens from seeing the padding).
        flat = labels.reshape(-1)
        idx = np.nonzero(flat != IGNORE)[0].astype(np.int32)
        return mx.array(ids), mx.array(idx), mx.array(flat[idx].astype(np.int32)), int(idx.size)

    def _loss_sum(self, model: nn.Module, ids: mx.array, idx: mx.array, targets: mx.array) -> mx.array:
        h = model.model(ids)
        h = mx.take(h.reshape(-1, h.shape[-1]), idx, axis=0)
        logits = self._head(h).astype(mx.float32)
        return nn.losses.cross_entropy(logits, targets, reduction="sum")

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> tuple[float, int, float]:
        assert self.opt is not None, "attach_adapter first"
        self.model.train()
        # Reseed per step: dropout masks then depend only on (seed, step) → exact resume.
        mx.random.seed(self.cfg.seed * 1_000_003 + self._step)
        self._step += 1
        self.opt.learning_rate = lr
        preps = [self._prep(b) for b in micro_batches]
        total = sum(p[3] for p in preps)
        vg = nn.value_and_grad(self.model, lambda m, i, x, t: self._loss_sum(m, i, x, t) / max(total, 1))
        grads, loss_total = None, 0.0
        for ids, idx, targets, n in preps:
            if n == 0:
                continue
            loss, g = vg(self.model, ids, idx, targets)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads)
            loss_total += float(loss) * total
        if grads is None:
            return 0.0, 0, 0.0
        if self.cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, self.cfg.max_grad_norm)
        else:
            norm = mx.sqrt(sum(mx.sum(g * g) for _, g in tree_flatten(grads)))
        norm_f = float(norm)
        if math.isfinite(loss_total) and math.isfinite(norm_f):
            self.opt.update(self.model, grads)
            mx.eval(self.model.trainable_parameters(), self.opt.state)
        return loss_total / max(total, 1), total, norm_f

    def eval_loss(self, batches: list[dict[str, Any]]) -> tuple[float, int]:
        self.model.eval()
        s, n = 0.0, 0
        for b in batches:
            ids, idx, targets, k = self._prep(b)
            if k:
                s += float(self._loss_sum(self.model, ids, idx, targets))
                n += k
        self.model.train()
        return s, n

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, dir: Path) -> None:
        mx.save_safetensors(str(dir / "adapter.safetensors"), dict(tree_flatten(self.model.trainable_parameters())))
        mx.save_safetensors(str(dir / "optimizer.safetensors"), dict(tree_flatten(self.opt.state)))
        (dir / "mlx_state.json").write_text(json.dumps({"step": self._step}))

    def load_checkpoint(self, dir: Path) -> None:
        self.model.load_weights(str(dir / "adapter.safetensors"), strict=False)
        self.opt.state = tree_unflatten(list(mx.load(str(dir / "optimizer.safetensors")).items()))
        self._step = json.loads((dir / "mlx_state.json").read_text())["step"]
        mx.eval(self.model.parameters(), self.opt.state)

    def rng_state(self) -> dict[str, Any]:
        return {}  # per-step reseeding (see train_step)

    def set_rng_state(self, state: dict[str, Any]) -> None:
        pass

    def save_adapter(self, dir: Path) -> dict[str, Any]:
        """mlx-lm layout: adapters.safetensors + adapter_config.json (mlx_lm.generate --adapter-path).

        PiSSA is converted to a plain LoRA of rank 2r on the original base; mlx-lm's
        ``scale`` is absolute, so it stays the same.
        """
        dir.mkdir(parents=True, exist_ok=True)
        info = dict(self.adapter_info)
        params = {k: np.array(v) for k, v in tree_flatten(self.model.trainable_parameters())}
        rank = info["rank"]
        if info["method"] == "pissa":
            for name, (a0, b0) in self.pissa0.items():
                a, b = to_plain_lora(params[name + ".lora_a"], params[name + ".lora_b"], a0, b0)
                params[name + ".lora_a"], params[name + ".lora_b"] = a, b
            rank = 2 * rank
        mx.save_safetensors(str(dir / "adapters.safetensors"), {k: mx.array(v) for k, v in params.items()})
        conf = {
            "fine_tune_type": "dora" if info["dora"] else "lora",
            "num_layers": len(self.model.model.layers),
            "lora_parameters": {"rank": rank, "scale": info["scale"], "dropout": 0.0, "keys": info["keys"]},
            "model": str(self.base.path),
        }
        (dir / "adapter_config.json").write_text(json.dumps(conf, indent=2))
        alpha = info["scale"] * (math.sqrt(rank) if info.get("rslora") else rank)
        return {"rank": rank, "alpha": alpha, "scale": info["scale"], "rslora": bool(info.get("rslora")),
                "dora": info["dora"], "target_modules": info["target_modules"], "layout": self.layout}

    def peak_memory(self) -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    # ------------------------------------------------------------------ inference (judge)

    def load_adapter(self, adapter_dir: Path) -> None:
        from mlx_lm.tuner.utils import load_adapters

        conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        load_adapters(self.model, str(adapter_dir))
        self.adapter_info = {"keys": conf["lora_parameters"]["keys"]}
        self.lora = []
        for layer in self.model.model.layers:
            for k in conf["lora_parameters"]["keys"]:
                parent_path, attr = k.rsplit(".", 1)
                parent = layer
                for part in parent_path.split("."):
                    parent = getattr(parent, part)
                self.lora.append((parent, attr, parent[attr]))
        self.model.eval()

    def set_adapter_enabled(self, enabled: bool) -> None:
        if not self.lora:
            if enabled:
                raise BackendError("no adapter loaded")
            return
        for parent, attr, lora in self.lora:
            parent[attr] = lora if enabled else lora.linear

    def encode(self, text: str) -> list[int]:
        return encode(self.tok, text)

    def input_ids(self, text: str) -> list[int]:
        return [self.start_id, *encode(self.tok, text)]

    def nll(self, texts: list[str]) -> list[float]:
        self.model.eval()
        out = []
        ctx = int(self.model.args.max_position_embeddings or 2048)
        for text in texts:
            ids = self.input_ids(text)
            total = 0.0
            for chunk in score_windows(ids, ctx, self.start_id):
                x = mx.array([chunk])
                logits = self.model(x)[0, :-1].astype(mx.float32)
                total += float(nn.losses.cross_entropy(logits, x[0, 1:], reduction="sum"))
            out.append(total)
        return out

    def logits(self, text: str) -> np.ndarray:
        self.model.eval()
        x = mx.array([self.input_ids(text)])
        return np.array(self.model(x)[0].astype(mx.float32))

    def generate(self, prompt: str, max_new_tokens: int = 64, stop: list[str] | None = None,
                 until: Callable[[str], bool] | None = None) -> str:
        from mlx_lm.models.cache import make_prompt_cache

        self.model.eval()
        cache = make_prompt_cache(self.model)
        x = mx.array([self.input_ids(prompt)])
        out: list[int] = []
        eos = {self.tok.eos_token_id}
        hit = stop_hit(stop)
        for _ in range(max_new_tokens):
            logits = self.model(x, cache=cache)[0, -1]
            nxt = int(mx.argmax(logits))
            if nxt in eos:
                break
            out.append(nxt)
            text = self.tok.decode(out, skip_special_tokens=True)
            if (hit is not None and hit(text)) or (until is not None and until(text)):
                break
            x = mx.array([[nxt]])
        text = self.tok.decode(out, skip_special_tokens=True)
        return cut_at_stop(text, stop)

    def generate_many(self, prompts: list[str], max_new_tokens: list[int],
                      until: list[Callable[[str], bool] | None] | None = None) -> list[str]:
        """One prompt at a time: on Apple silicon a single decode stream is already fast."""
        until = until or [None] * len(prompts)
        return [self.generate(p, n, until=u) for p, n, u in zip(prompts, max_new_tokens, until, strict=True)]

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
