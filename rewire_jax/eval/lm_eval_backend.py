"""lm-evaluation-harness backend: rewire-jax models as an `lm_eval` model (`pip install 'rewire-jax[eval]'`).

    import lm_eval
    from rewire_jax.eval.lm_eval_backend import RewireLM
    lm = RewireLM(pretrained="DIR", rewire=True, steps=5, interval=128, batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

    rewire-jax lm-eval --model rewire-jax --model_args pretrained=DIR,rewire=true,steps=5 --tasks hellaswag

lm-eval does not discover models outside its tree: `register()` (run by importing this module and by
`rewire-jax lm-eval`) adds `RewireLM` to its registry as `rewire-jax` (alias `rewire_jax`).

What each request type does (options from `model_args`: any `RewireOptions` field, `rewire=false`
for the baseline):
- generate_until: `rewire_jax.generate_queue` through `eval.backend.generate_backend` (each row
  its own deltas and phase schedule: a phase on the prompt, then one every `interval` tokens); a
  row ends at EOS, `max_gen_toks` or a stop string (`until`); the text is cut at the first stop.
  Greedy text equals `rewire_jax.generate` on the same prompt and options (tests/test_lm_eval.py).
- loglikelihood: with `loglikelihood_rewire` (default: `rewire`) one phase on the context (what
  generation runs on a prompt), then the continuation is scored teacher-forced with those deltas
  (no further phase inside the continuation); otherwise the plain model. `eval.lm_eval_scoring`.
- loglikelihood_rolling: lm-eval's disjoint rolling windows (max_length tokens each), scored by the
  plain model whatever `rewire` says: a perplexity has no prompt to optimise on, and optimising on
  the scored text itself would leak the targets.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import numpy as np

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval import utils as lm_utils
except ImportError as e:   # the optional extra
    raise ImportError("the lm-evaluation-harness backend needs lm_eval>=0.4.10: "
                      "pip install 'rewire-jax[eval]'") from e

from .. import RewireOptions, Sampling
from ..model.transformer import prepare_params
from .backend import Request, generate_backend
from .lm_eval_scoring import context_deltas, score_sequences
from .methods import rewire_options

log = logging.getLogger(__name__)
NAMES = ("rewire-jax", "rewire_jax")
_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1", "false", "0"):
        return str(v).lower() in ("true", "1")
    raise ValueError(f"model_args {name}={v!r}: expected true or false")


def parse_batch_size(batch_size: Any, max_batch_size: Optional[int]) -> int:
    """lm-eval's batch_size (int, '8', 'auto', 'auto:N') -> rows per batch. 'auto' has nothing to
    tune here (no OOM probing): it means max_batch_size, else 16."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or 16)
    try:
        b = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={batch_size!r}: expected a positive integer or 'auto'") from None
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {b}")
    return b


def options_from_args(fields: dict, seed: int) -> RewireOptions:
    """model_args entries naming RewireOptions fields ({'steps': 5, 'selection': 'hard'}) -> options."""
    valid = {f.name for f in dataclasses.fields(RewireOptions)}
    bad = sorted(set(fields) - valid)
    if bad:
        raise ValueError(f"unknown model_args {', '.join(bad)}; RewireLM takes pretrained, rewire, "
                         f"loglikelihood_rewire, dtype, dispatch, revision, batch_size, max_length, max_gen_toks, "
                         f"add_bos_token, seed and the RewireOptions fields: {', '.join(sorted(valid))}")
    spec = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())
    return rewire_options(spec, RewireOptions(seed=seed))


class RewireLM(TemplateLM):
    """A rewire-jax model as an lm-eval `LM`. Arguments are lm-eval `model_args` (strings or the
    values lm-eval parsed them into), or `model=` an already loaded `rewire_jax.Model`.

    pretrained: model directory or hub id (default: the bundled demo model); dtype, dispatch,
    revision: as `rewire_jax.load`. rewire: rewire generate_until (and loglikelihood, unless
    loglikelihood_rewire says otherwise). Other keyword arguments: RewireOptions fields (steps,
    interval, lr, selection, ...). seed: sampling seed and RewireOptions.seed. batch_size: rows per
    generation batch and per scoring / optimisation batch. max_length: longest input (default the
    model's max_position_embeddings); max_gen_toks: default generation budget. add_bos_token: None
    (the tokenizer's default special tokens) or a bool. device: JAX places arrays on its default
    backend (JAX_PLATFORMS); the argument is accepted for lm-eval's CLI and otherwise ignored, as is
    trust_remote_code (rewire-jax runs no checkpoint code).
    """

    def __init__(self, pretrained: Optional[str] = None, rewire: Any = True, loglikelihood_rewire: Any = None,
                 dtype: str = "float32", dispatch: Optional[str] = None, revision: Optional[str] = None,
                 batch_size: Any = 1, max_batch_size: Optional[int] = None, device: Optional[str] = None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, add_bos_token: Any = None,
                 seed: int = 0, model: Any = None, trust_remote_code: Any = None, **rewire_fields):
        super().__init__()
        if device:
            log.info("device=%s ignored: JAX runs on its default backend (select it with JAX_PLATFORMS)", device)
        self.rewire_options = options_from_args(rewire_fields, int(seed))
        self.rewire = _as_bool("rewire", rewire)
        self.loglikelihood_rewire = self.rewire if loglikelihood_rewire is None else \
            _as_bool("loglikelihood_rewire", loglikelihood_rewire)
        self.batch_size = parse_batch_size(batch_size, max_batch_size)
        self.seed = int(seed)
        if model is None:
            from .. import load
            from ..demo import DEMO_MODEL
            model = load(pretrained or DEMO_MODEL, dtype=str(dtype), dispatch=dispatch, revision=revision)
        elif pretrained is not None:
            raise ValueError("give either pretrained= (a path to load) or model= (a loaded model), not both")
        if model.tokenizer is None:
            raise ValueError(f"model at {model.path} has no tokenizer files: lm-eval sends text")
        self.model, self.tokenizer = model, model.tokenizer
        self._max_length = int(max_length or model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else _as_bool("add_bos_token", add_bos_token)
        self._generate = generate_backend(model, batch_size=self.batch_size)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "RewireLM":
        """lm-eval's constructor path; model_args win over the CLI's batch_size / device (lm-eval
        always passes its default batch_size=1, which would otherwise clash with model_args')."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "RewireLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    # --- tokenization and lm-eval's properties ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.model.config.eos_token_ids[0])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        """Text -> ids. add_special_tokens None: `add_bos_token`, else the tokenizer's default, and no
        second BOS when the text (e.g. from a chat template) already starts with it."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.bos_token
            if bos and string.startswith(bos):
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return list(self.tokenizer.encode(string, **kw))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.model.path} has no chat template: run without "
                             f"--apply_chat_template (or use a model whose tokenizer_config.json has one)")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return {"model_path": self.model.path, "dtype": self.model.config.dtype,
                "rewire": dataclasses.asdict(self.rewire_options) if self.rewire else None,
                "loglikelihood_rewire": self.loglikelihood_rewire}

    # --- requests -----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with (context, gen_kwargs) args -> completions, batched per sampling setting."""
        jobs: dict[Sampling, list] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            sampling, budget, until = self._gen_settings(gen_kwargs)
            ids = self.tok_encode(context)[-max(1, self.max_length - budget):]   # lm-eval's left truncation
            if not ids:
                raise ValueError(f"request {i}: the context tokenizes to nothing (the model needs >= 1 token)")
            jobs.setdefault(sampling, []).append((i, Request(tuple(ids), budget, tuple(until))))
        out: list = [None] * len(requests)
        for sampling, items in jobs.items():
            comps = self._generate([r for _, r in items], self.rewire_options if self.rewire else None,
                                   sampling, self.seed)
            for (i, _), c in zip(items, comps):
                out[i] = c.text
                self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out

    def _gen_settings(self, gen_kwargs: dict) -> tuple[Sampling, int, list[str]]:
        """lm-eval gen_kwargs -> (Sampling, max new tokens, stop strings)."""
        kw = dict(gen_kwargs or {})
        budget = kw.pop("max_gen_toks", None)
        for alias in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            v = kw.pop(alias, None)
            budget = v if budget is None else budget
        unknown = sorted(set(kw) - _GEN_KEYS)
        if unknown:
            raise ValueError(f"generation kwargs {', '.join(unknown)} are not supported by rewire-jax; "
                             f"supported: {', '.join(sorted(_GEN_KEYS | {'max_new_tokens'}))}")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = kw.get("do_sample")
        temperature = float(kw.get("temperature") or 0.0)
        if do_sample is False or (do_sample is None and temperature == 0.0):
            sampling = Sampling()
        else:
            sampling = Sampling(temperature or 1.0, int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0))
        budget = int(self.max_gen_toks if budget is None else budget)
        if not 1 <= budget < self.max_length:
            raise ValueError(f"max_gen_toks={budget} must be in [1, max_length={self.max_length})")
        return sampling, budget, until

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, rewire: Optional[bool] = None,
                              **kwargs) -> list[tuple[float, bool]]:
        """[(cache key, context ids, continuation ids)] -> [(sum of continuation log-probs, is greedy)].
        The input is left-truncated to max_length + 1 tokens, as lm-eval's HF backend does."""
        seqs, n_cont, contexts = [], [], []
        for key, ctx, cont in requests:
            if not cont:
                raise ValueError(f"empty continuation for {key!r}: nothing to score")
            if len(cont) > self.max_length:
                raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            seqs.append(full)
            n_cont.append(len(cont))
            contexts.append(full[:-len(cont)])
        rewire = self.loglikelihood_rewire if rewire is None else rewire
        params = prepare_params(self.model.params, self.model.config)
        cfg = self.model.config
        deltas = context_deltas(params, cfg, self.rewire_options, contexts, self.batch_size) \
            if rewire and self.rewire_options.enabled else None   # selection='none' is the baseline
        out = score_sequences(params, cfg, seqs, n_cont, deltas, self.batch_size)
        for (key, _, _), res in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood over lm-eval's disjoint rolling windows (max_length),
        never rewired (see the module doc)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, rewire=False) if windows else []
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, int), [s for s, _ in scores])
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, float(total))
        return [float(t) for t in totals]


def register() -> type:
    """Add RewireLM to lm-eval's model registry as 'rewire-jax' / 'rewire_jax' (idempotent)."""
    import lm_eval.models  # noqa: F401  lm-eval's own models first: an empty registry would skip them
    from lm_eval.api.registry import model_registry

    for name in NAMES:
        try:
            model_registry.register(name)(RewireLM)
        except ValueError:   # the name holds a RewireLM of an earlier import of this module (a reload)
            model_registry._objs[name] = RewireLM
    return RewireLM


register()

CLI_HELP = """\
rewire-jax lm-eval [lm-eval arguments]: lm-evaluation-harness's own CLI with the rewire-jax backend
registered as --model rewire-jax (the default here when no --model / --config is given).

  rewire-jax lm-eval --model rewire-jax --tasks hellaswag --batch_size 8 \\
      --model_args pretrained=DIR,rewire=true,steps=5,interval=128,selection=soft,dtype=float32

model_args: pretrained (model directory or hub id; default: the bundled demo model), rewire
(true/false: rewire generate_until, and loglikelihood unless loglikelihood_rewire=false: one phase
on the context, then the continuation scored with those deltas), any RewireOptions field (steps,
interval, lr, weight_decay, eps, selection, ratio, soft_mode, confidence, loss, persist_optimizer,
continuous, last_k), seed, dtype, dispatch, revision, max_length, max_gen_toks, add_bos_token,
batch_size (rows per batch; wins over --batch_size). Everything after `lm-eval` goes to lm-eval
unchanged; its `run` help follows.
"""


def cli_main(argv: list[str]) -> int:
    """Register the backend, then run lm-eval's CLI (`lm_eval.__main__.cli_evaluate`) on argv."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(CLI_HELP)
        argv = ["run", "--help"]
    elif argv[0] not in ("ls", "validate") and not any(
            a in ("--model", "-M", "--config", "-C") or a.startswith("--model=") for a in argv):
        argv += ["--model", NAMES[0]]
    old = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:   # argparse's --help and errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0
