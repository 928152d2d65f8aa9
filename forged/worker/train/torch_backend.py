"""PyTorch back end: transformers + PEFT (LoRA, PiSSA, rsLoRA, DoRA), packed batches.

Packed rows are fed with a block-diagonal causal mask (4D, additive) and per-example
``position_ids``, so examples never see each other. Logits are computed only at
target positions: the LM head over a 49k vocab is the single biggest matmul, and
prompt tokens, padding and segment ends need none.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from forged.common.backends import BackendError
from forged.common.config import TrainConfig
from forged.common.models import BaseModel, ModelError
from forged.worker.train.backend import resolve_targets
from forged.worker.train.data import (
    completion_ids,
    cut_at_stop,
    encode,
    score_windows,
    start_id,
    stop_hit,
    token_ids,
)
from forged.worker.train.models import cached_dequantized, dequantized_dir, load_tokenizer
from forged.worker.train.packing import IGNORE

PEFT_WEIGHTS = "adapter_model.safetensors"
GEN_MAX_BATCH = 8  # rows per generate() call
GEN_BATCH_TOKENS = 4096  # padded prompt tokens per call: long (RAFT) prompts go alone — prefill gains nothing from batching


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class TorchBackend:
    name = "torch"
    batching = "pack"
    layout = "hf"  # transformers un-permutes GGUF q/k rows on load

    def __init__(self, base: BaseModel, cfg: TrainConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.base, self.cfg = base, cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = _device()
        self.tok = load_tokenizer(base)
        self.start_id = start_id(self.tok)
        self.notes: list[str] = []
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if cfg.quantized:
            if self.device.type == "cuda" and _has_bnb():
                from transformers import BitsAndBytesConfig

                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
            else:
                self.notes.append("quantized=true needs bitsandbytes on CUDA; training at full precision instead")
                cfg.quantized = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if base.kind == "gguf" and (cached := cached_dequantized(base)) is not None:
                    model = AutoModelForCausalLM.from_pretrained(str(cached), **kwargs)
                elif base.kind == "gguf":
                    model = AutoModelForCausalLM.from_pretrained(str(base.path.parent), gguf_file=base.path.name, **kwargs)
                    if "quantization_config" not in kwargs:
                        dequantized_dir(base, model)  # the next stage's load takes ~1 s instead of ~25
                else:
                    model = AutoModelForCausalLM.from_pretrained(str(base.path), **kwargs)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise ModelError(
                f"PyTorch back end cannot load {base.spec} (architecture {base.architecture!r}): "
                f"{str(e).splitlines()[0][:200]} — try an HF directory of a supported model or backend = 'mlx'"
            ) from None
        if not hasattr(model, "model") or not hasattr(model, "lm_head"):
            raise ModelError(f"{base.spec}: architecture {base.architecture!r} is not a decoder-only causal LM forged can train")
        self.model = model.to(self.device)
        self.model.config.use_cache = False
        self.peft: Any = None
        self.opt: torch.optim.Optimizer | None = None
        self.pissa_init: dict[str, torch.Tensor] | None = None
        self.adapter_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ adapter

    def _lora_config(self, cfg: TrainConfig, r: int, alpha: float, init: Any, rslora: bool, dora: bool) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=cfg.dropout, target_modules=self._targets(cfg.target_modules),
            use_rslora=rslora, use_dora=dora, init_lora_weights=init, bias="none", task_type="CAUSAL_LM",
        )

    def attach_adapter(self, cfg: TrainConfig, *, warm_start: Path | None, init_dir: Path) -> dict[str, Any]:
        """Fresh LoRA/PiSSA, or the live adapter (a plain LoRA) as the starting point."""
        from peft import PeftModel, get_peft_model

        self._targets(cfg.target_modules)
        torch.manual_seed(cfg.seed)  # adapter init and randomized SVD are seeded → resume rebuilds them
        if warm_start is not None:
            self.peft = PeftModel.from_pretrained(self.model, str(warm_start), is_trainable=True)
            pc = self.peft.peft_config["default"]
            info = {"method": "lora", "rank": pc.r, "alpha": pc.lora_alpha, "rslora": pc.use_rslora,
                    "dora": pc.use_dora, "warm_start": str(warm_start)}
        else:
            if cfg.method == "pissa" and cfg.dora:
                raise BackendError("dora = true works with method = 'lora' only (a PiSSA+DoRA adapter cannot be "
                                   "converted to a plain LoRA on the original base)")
            init: Any = True
            if cfg.method == "pissa":
                init = "pissa" if cfg.pissa_niter == 0 else f"pissa_niter_{cfg.pissa_niter}"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.peft = get_peft_model(self.model, self._lora_config(cfg, cfg.rank, cfg.alpha, init, cfg.rslora, cfg.dora))
            info = {"method": cfg.method, "rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora, "dora": cfg.dora}
            if cfg.method == "pissa":
                self._pin_pissa_init(init_dir)
        info["scale"] = info["alpha"] / (math.sqrt(info["rank"]) if info["rslora"] else info["rank"])
        info["target_modules"] = self._targets(cfg.target_modules)
        self.adapter_info = info
        params = [p for p in self.peft.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, betas=(0.9, 0.999))
        if cfg.grad_checkpoint:
            self.peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.peft.train()
        return info

    def _targets(self, targets: list[str]) -> list[str]:
        """The model's names for the configured target modules (see ``resolve_targets``),
        found once on the plain model (PEFT's wrapping renames its linear layers)."""
        if getattr(self, "_target_names", None) is not None:
            return list(self._target_names)
        names = {n.rsplit(".", 1)[-1] for n, m in self.model.named_modules() if isinstance(m, torch.nn.Linear)}
        found, missing = resolve_targets(list(targets), names)
        if missing:
            raise BackendError(f"target_modules {missing} not found in {self.base.spec} (its linear layers: {sorted(names)})")
        self._target_names = found
        return found

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(self.peft).items()}

    def _pin_pissa_init(self, init_dir: Path) -> None:
        """Keep A0/B0 (needed to convert to a plain LoRA). If an earlier run of this
        cycle stored them, make this run's residual base identical to that run's:
        W_res := W_res' + s(B0'A0' - B0A0), exact even if the SVD is not reproducible."""
        f = init_dir / "pissa_init.safetensors"
        now = self._adapter_state()
        if f.exists():
            stored = load_file(str(f))
            if stored.keys() != now.keys():
                raise BackendError(f"{f}: does not match this adapter (targets or rank changed); delete the checkpoints to start fresh")
            s = self.cfg.alpha / (math.sqrt(self.cfg.rank) if self.cfg.rslora else self.cfg.rank)
            with torch.no_grad():
                for name, mod in self.peft.named_modules():
                    if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                        continue
                    key = _state_key(name)
                    a_new, b_new = now[key + ".lora_A.weight"], now[key + ".lora_B.weight"]
                    a0, b0 = stored[key + ".lora_A.weight"], stored[key + ".lora_B.weight"]
                    w = mod.base_layer.weight
                    w += (s * (b_new @ a_new - b0 @ a0)).to(w.dtype, copy=False).to(w.device)
                    mod.lora_A["default"].weight.copy_(a0)
                    mod.lora_B["default"].weight.copy_(b0)
            self.pissa_init = stored
        else:
            init_dir.mkdir(parents=True, exist_ok=True)
            save_file(now, str(f))
            self.pissa_init = now

    # ------------------------------------------------------------------ training

    def _tensors(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        ids = torch.tensor(batch["input_ids"], device=self.device)
        labels = torch.tensor(batch["labels"], device=self.device)
        pos = torch.tensor(batch["position_ids"], device=self.device)
        seg = torch.tensor(batch["segment_ids"], device=self.device)
        T = ids.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=self.device).tril()
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal
        allowed |= torch.eye(T, dtype=torch.bool, device=self.device)  # padding attends to itself: no NaN rows
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return ids, labels, pos, mask[:, None]

    def _loss_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        ids, labels, pos, mask = self._tensors(batch)
        core = (self.peft.base_model.model if self.peft is not None else self.model)
        hidden = core.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        sel = labels != IGNORE
        logits = core.lm_head(hidden[sel]).float()
        loss = torch.nn.functional.cross_entropy(logits, labels[sel], reduction="sum")
        return loss, int(sel.sum())

    def train_step(self, micro_batches: list[dict[str, Any]], lr: float) -> tuple[float, int, float]:
        assert self.opt is not None, "attach_adapter first"
        self.peft.train()
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = sum(sum(1 for x in row if x != IGNORE) for b in micro_batches for row in b["labels"])
        self.opt.zero_grad(set_to_none=True)
        loss_total = 0.0
        for b in micro_batches:
            loss, _ = self._loss_sum(b)
            (loss / max(total, 1)).backward()  # mean over all target tokens of the step
            loss_total += float(loss.detach())
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.cfg.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        if math.isfinite(loss_total) and math.isfinite(norm):
            self.opt.step()
        return loss_total / max(total, 1), total, norm

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, Any]]) -> tuple[float, int]:
        m = self.peft or self.model
        was = m.training
        m.eval()
        s, n = 0.0, 0
        for b in batches:
            loss, k = self._loss_sum(b)
            s, n = s + float(loss), n + k
        m.train(was)
        return s, n

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, dir: Path) -> None:
        save_file(self._adapter_state(), str(dir / "adapter.safetensors"))
        torch.save(self.opt.state_dict(), dir / "optimizer.pt")

    def load_checkpoint(self, dir: Path) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.peft, load_file(str(dir / "adapter.safetensors")))
        self.opt.load_state_dict(torch.load(dir / "optimizer.pt", weights_only=True))

    def rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state().tolist()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))

    def save_adapter(self, dir: Path) -> dict[str, Any]:
        """PEFT layout (adapter_config.json + adapter_model.safetensors) on the ORIGINAL base.

        PiSSA is converted to a plain LoRA of rank 2r: ΔW = s(BA − B0A0) = s[B | −B0][A ; A0];
        alpha is rescaled so the effective multiplier s stays the same at rank 2r.
        """
        dir.mkdir(parents=True, exist_ok=True)
        info = dict(self.adapter_info)
        if info["method"] != "pissa":
            self.peft.save_pretrained(str(dir))
        else:
            state, init = self._adapter_state(), self.pissa_init
            out: dict[str, torch.Tensor] = {}
            for k, v in state.items():
                if k.endswith("lora_A.weight"):
                    out[k] = torch.cat([v, init[k]], dim=0).contiguous()
                elif k.endswith("lora_B.weight"):
                    out[k] = torch.cat([v, -init[k]], dim=1).contiguous()
            r2 = 2 * info["rank"]
            s = info["scale"]
            alpha2 = s * (math.sqrt(r2) if info["rslora"] else r2)
            pc = self._lora_config(self.cfg, r2, alpha2, True, info["rslora"], False)
            pc.base_model_name_or_path = str(self.base.path)
            pc.save_pretrained(str(dir))
            save_file(out, str(dir / PEFT_WEIGHTS), metadata={"format": "pt"})
            info.update(rank=r2, alpha=alpha2)
        cfg_file = dir / "adapter_config.json"
        c = json.loads(cfg_file.read_text())
        c["base_model_name_or_path"] = str(self.base.path)
        cfg_file.write_text(json.dumps(c, indent=2))
        return {"rank": info["rank"], "alpha": info["alpha"], "scale": info["scale"], "rslora": info["rslora"],
                "dora": info["dora"], "target_modules": info["target_modules"], "layout": self.layout}

    def peak_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    # ------------------------------------------------------------------ inference (judge)

    def load_adapter(self, adapter_dir: Path) -> None:
        from peft import PeftModel

        self.peft = PeftModel.from_pretrained(self.model, str(adapter_dir), is_trainable=False)
        self.peft.eval()

    def set_adapter_enabled(self, enabled: bool) -> None:
        if self.peft is None:
            if enabled:
                raise BackendError("no adapter loaded")
            return
        lm = self.peft.base_model
        merged = any(getattr(m, "merged", False) for m in lm.modules())
        if enabled:
            lm.enable_adapter_layers()
            if not self.peft.training and not merged:
                # Inference (judge, fidelity): fold BA into W. The unmerged adapter adds
                # four small ops per projection per token, which on a CPU costs decode
                # about as much as the projection itself.
                lm.merge_adapter()
        else:
            if merged:
                lm.unmerge_adapter()
            lm.disable_adapter_layers()

    def encode(self, text: str) -> list[int]:
        return encode(self.tok, text)

    def input_ids(self, text: str) -> list[int]:
        return [self.start_id, *encode(self.tok, text)]

    def _core(self) -> Any:
        return self.peft.base_model.model if self.peft is not None else self.model

    @torch.no_grad()
    def nll(self, texts: list[str]) -> list[float]:
        out = []
        ctx = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        for text in texts:
            ids = self.input_ids(text)
            total = 0.0
            for chunk in score_windows(ids, ctx, self.start_id):
                x = torch.tensor([chunk], device=self.device)
                logits = self._core()(input_ids=x).logits[0, :-1].float()
                total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            out.append(total)
        return out

    @torch.no_grad()
    def completion_nll(self, prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            p, c = completion_ids(self.tok, prompt, completion)
            x = torch.tensor([[self.start_id, *p, *c]], device=self.device)
            # only the positions that predict the completion: the vocabulary projection of the
            # prompt's positions is a fifth of the forward pass for a small model
            logits = self._core()(input_ids=x, logits_to_keep=len(c) + 1).logits[0, :-1].float()
            out.append(float(torch.nn.functional.cross_entropy(logits, x[0, 1 + len(p):], reduction="sum")))
        return out

    @torch.no_grad()
    def logits(self, text: str) -> np.ndarray:
        x = torch.tensor([self.input_ids(text)], device=self.device)
        return self._core()(input_ids=x).logits[0].float().cpu().numpy()

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int = 64, stop: list[str] | None = None) -> str:
        return cut_at_stop(self.generate_many([prompt], [max_new_tokens], [stop_hit(stop)])[0], stop)

    @torch.no_grad()
    def generate_many(self, prompts: list[str], max_new_tokens: list[int],
                      until: list[Callable[[str], bool] | None] | None = None,
                      stop_tokens: list[str] | None = None) -> list[str]:
        """Greedy completions, batched: prompts sorted by length, left-padded, each row
        stopping at its own budget, EOS, or once ``until[i](text)`` holds.

        On a CPU a decode step costs about the same for 1 row or 8 (it is the weights'
        memory traffic and per-op overhead), so batching divides decode time; batches
        are capped at ``GEN_BATCH_TOKENS`` prompt tokens to bound prefill memory.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        until = until or [None] * len(prompts)
        ids = [self.input_ids(p) for p in prompts]
        out = [""] * len(prompts)
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        ends = {eos, *token_ids(self.tok, stop_tokens or [])}
        tok = self.tok

        class RowStop(StoppingCriteria):
            def __init__(self, rows: list[int], width: int) -> None:
                self.rows, self.width = rows, width
                self.ended: list[int | None] = [None] * len(rows)  # tokens generated when the row ended

            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                n = input_ids.shape[1] - self.width
                for r, i in enumerate(self.rows):
                    if self.ended[r] is not None:
                        continue
                    new = input_ids[r, self.width:]
                    if (n >= max_new_tokens[i] or int(new[-1]) in ends
                            or (until[i] is not None and until[i](tok.decode(new, skip_special_tokens=True)))):
                        self.ended[r] = n
                return torch.tensor([e is not None for e in self.ended], device=input_ids.device)

        m = self._core()
        m.config.use_cache = True
        try:
            # A batch decodes until its longest budget is spent (or every row has stopped):
            # rows with like budgets go together, so one-line middles do not wait on
            # multi-line ones; then by length, to pad little.
            order = sorted(range(len(prompts)), key=lambda i: (max_new_tokens[i], len(ids[i])))
            while order:
                rows = [order.pop(0)]
                width = len(ids[rows[0]])
                while (order and len(rows) < GEN_MAX_BATCH
                       and (len(rows) + 1) * max(width, len(ids[order[0]])) <= GEN_BATCH_TOKENS):
                    rows.append(order.pop(0))
                    width = max(width, len(ids[rows[-1]]))
                x = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in rows], device=self.device)
                mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in rows], device=self.device)
                stop = RowStop(rows, width)
                y = m.generate(input_ids=x, attention_mask=mask, max_new_tokens=max(max_new_tokens[i] for i in rows),
                               do_sample=False, eos_token_id=sorted(ends), pad_token_id=pad,
                               stopping_criteria=StoppingCriteriaList([stop]))
                for r, i in enumerate(rows):
                    new = y[r, width:width + (stop.ended[r] or max_new_tokens[i])].tolist()
                    cut = next((k for k, t in enumerate(new) if t in ends), None)
                    if cut is not None:
                        new = new[:cut]
                    out[i] = self.tok.decode(new, skip_special_tokens=True)
        finally:
            m.config.use_cache = False
        return out

    def chat_prompt(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _state_key(module_name: str) -> str:
    """PEFT module name → the prefix of its keys in get_peft_model_state_dict."""
    return module_name


def _has_bnb() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None and os.environ.get("FORGED_NO_BNB") != "1"
