"""EncoderDecoderModel: the loss, scoring and decoding around the network (T5X's split).

The Module (:class:`jaxmt.modeling.network.EncoderDecoder`) only computes logits; this
class owns what a training or inference loop needs from it: parameters, the loss,
scores and :meth:`EncoderDecoderModel.predict_batch`. Nothing outside it touches the
Module; decoding strategies (:mod:`jaxmt.modeling.decoding`) receive it from here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxmt.config import DecodeConfig, ModelConfig
from jaxmt.data.packing import BATCH_KEYS, LANG_KEYS
from jaxmt.modeling import decoding
from jaxmt.modeling.beam_search import beam_search
from jaxmt.modeling.network import EncoderDecoder

Array = jax.Array
PyTree = Any



@jax.custom_vjp
def _ce_stats(logits: Array, targets: Array) -> tuple[Array, Array, Array, Array]:
    """Per-token (logsumexp, target logit, sum of logits, max logit) of float32 logits.

    Everything the smoothed loss, the z-loss and the accuracy need, without a
    [b, t, vocab] log-softmax in memory. The backward is one fused pass that writes
    d logits = g_lse * softmax + g_target * onehot + g_sum (the max is a metric only).
    """
    return _ce_stats_fwd(logits, targets)[0]


def _ce_stats_fwd(logits, targets):
    m = jnp.max(logits, axis=-1)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1))
    tl = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (lse, tl, jnp.sum(logits, axis=-1), m), (logits, targets, lse)


def _ce_stats_bwd(res, g):
    logits, targets, lse = res
    g_lse, g_tl, g_sum, _ = g  # the max feeds metrics only: not differentiated
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    onehot = vocab_ids == targets[..., None]
    d = (jnp.exp(logits - lse[..., None]) * g_lse[..., None] + g_sum[..., None]
         + jnp.where(onehot, g_tl[..., None], 0.0))
    return d.astype(logits.dtype), None


_ce_stats.defvjp(_ce_stats_fwd, _ce_stats_bwd)


def _cross_entropy(logits, targets, weights, label_smoothing, z_loss):
    """:func:`cross_entropy` plus per-token (target logit, max logit) for the accuracy."""
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # Subtract the entropy of the smoothed target so a perfect model scores 0.
    normalizer = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    log_z, tgt_logit, logit_sum, max_logit = _ce_stats(logits, targets)  # each [b, t]
    nll = log_z - tgt_logit
    smooth = vocab * log_z - logit_sum  # sum over vocab of -log p
    loss = confidence * nll + low * (smooth - nll) - normalizer
    zl = z_loss * jnp.square(log_z)
    sums = (jnp.sum((loss + zl) * weights), jnp.sum(zl * weights), jnp.sum(nll * weights))
    return sums, tgt_logit, max_logit


def cross_entropy(logits: Array, targets: Array, weights: Array, label_smoothing: float,
                  z_loss: float) -> tuple[Array, Array, Array]:
    """Token-level smoothed cross entropy in float32.

    Returns (summed loss, summed z-loss, summed unsmoothed NLL), each weighted by
    ``weights``; callers normalise by the number of target tokens.
    """
    return _cross_entropy(logits, targets, weights, label_smoothing, z_loss)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _kd_kl(student: Array, teacher: Array, temperature: float) -> Array:
    """Per-token KL(softmax(teacher / T) || softmax(student / T)), [b, t], of float32
    logits [b, t, n].

    The backward is one fused pass, d student = g / T * (p_student - p_teacher), from the
    two logits arrays (kept anyway) and two [b, t] log-normalisers: no [b, t, n]
    probabilities are kept. The teacher gets no gradient.
    """
    return _kd_kl_fwd(student, teacher, temperature)[0]


def _log_normaliser(x: Array) -> Array:
    m = jnp.max(x, axis=-1, keepdims=True)
    return (m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def _kd_kl_fwd(student, teacher, temperature):
    s, t = student / temperature, teacher / temperature  # fused into the reductions
    lse_s, lse_t = _log_normaliser(s), _log_normaliser(t)  # [b, t] each
    # sum_v p_t (log p_t - log p_s) = sum_v p_t (t - s) - lse_t + lse_s, as sum_v p_t = 1.
    kl = jnp.sum(jnp.exp(t - lse_t[..., None]) * (t - s), axis=-1) - lse_t + lse_s
    return kl, (student, teacher, lse_s, lse_t)


def _kd_kl_bwd(temperature, res, g):
    student, teacher, lse_s, lse_t = res
    d = (g / temperature)[..., None] * (jnp.exp(student / temperature - lse_s[..., None])
                                        - jnp.exp(teacher / temperature - lse_t[..., None]))
    return d.astype(student.dtype), None


_kd_kl.defvjp(_kd_kl_fwd, _kd_kl_bwd)


def distill_kl(student_logits: Array, teacher_logits: Array, weights: Array,
               temperature: float, ids: int | tuple[np.ndarray, np.ndarray] | None = None
               ) -> Array:
    """The distillation term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``
    per target token, summed over the tokens weighted by ``weights`` (callers normalise
    by the token count, as for :func:`cross_entropy`). Float32; no gradient reaches the
    teacher.

    Args:
      student_logits: [b, t, V_s] logits.
      teacher_logits: [b, t, V_t] logits of the same batch.
      weights: [b, t] (``decoder_loss_weights``).
      temperature: T > 0.
      ids: which columns are compared. None: every one (V_s == V_t); n: the first n on
        both sides (identical vocabularies, padding rows past the pieces left out);
        ``(student_ids, teacher_ids)``: [S] ids of the pieces both vocabularies share,
        each side's logits gathered there and both softmaxes taken over those S only.
    """
    s = student_logits.astype(jnp.float32)
    t = teacher_logits.astype(jnp.float32)
    if isinstance(ids, tuple):
        s = jnp.take(s, jnp.asarray(ids[0]), axis=-1)  # [b, t, S]
        t = jnp.take(t, jnp.asarray(ids[1]), axis=-1)  # [b, t, S]
    elif ids is not None:
        s = s if s.shape[-1] == ids else s[..., :ids]
        t = t if t.shape[-1] == ids else t[..., :ids]
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"distillation over {s.shape[-1]} student and {t.shape[-1]} teacher "
                         "columns: pass the vocabulary alignment's ids")
    return temperature ** 2 * jnp.sum(_kd_kl(s, t, float(temperature)) * weights)


class EncoderDecoderModel:
    """Parameters, loss, scoring and decoding for :class:`EncoderDecoder`."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.module = EncoderDecoder(cfg)

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The features a training batch needs: :data:`BATCH_KEYS`, and with adapters
        their routing ids (:data:`LANG_KEYS`)."""
        return BATCH_KEYS + (LANG_KEYS if self.cfg.adapter.size else ())

    def dummy_batch(self, batch: int, src_len: int, tgt_len: int) -> dict[str, Array]:
        """All ones (routing ids: every token to the first adapter), for shapes and init."""
        shapes = {k: (batch, src_len if k.startswith("encoder") else tgt_len)
                  for k in self.batch_keys}
        # numpy, not jnp: making them compiles nothing (the planner counts compiles).
        return {k: np.ones(s, np.int32) if k not in LANG_KEYS else np.zeros(s, np.int32)
                for k, s in shapes.items()}

    def random_batch(self, batch: int, src_len: int, tgt_len: int, seed: int = 0
                     ) -> dict[str, np.ndarray]:
        """Full rows (no padding) of random ids >= 3: for benchmarks and tests.

        Targets are the source ids (a copy task), shifted right for the decoder input.
        With adapters, every token is routed to the first one.
        """
        rng = np.random.default_rng(seed)
        src = rng.integers(3, self.cfg.vocab_size, (batch, src_len)).astype(np.int32)
        tgt = rng.integers(3, self.cfg.vocab_size, (batch, tgt_len)).astype(np.int32)
        tgt[:, :min(src_len, tgt_len)] = src[:, :min(src_len, tgt_len)]
        ones = lambda n: np.ones((batch, n), np.int32)
        pos = lambda n: np.tile(np.arange(n, dtype=np.int32), (batch, 1))
        dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
        out = dict(encoder_input_tokens=src, encoder_segment_ids=ones(src_len),
                   encoder_positions=pos(src_len), decoder_input_tokens=dec,
                   decoder_target_tokens=tgt, decoder_loss_weights=ones(tgt_len),
                   decoder_segment_ids=ones(tgt_len), decoder_positions=pos(tgt_len))
        if self.cfg.adapter.size:
            zeros = lambda n: np.zeros((batch, n), np.int32)  # noqa: E731
            out.update(encoder_lang_ids=zeros(src_len), decoder_lang_ids=zeros(tgt_len))
        return out

    def init(self, rng: Array, batch: dict[str, Array]) -> PyTree:
        """Boxed parameters (``nn.LogicallyPartitioned`` leaves carry logical axes)."""
        return self.module.init(rng, batch, deterministic=True)["params"]

    def param_shapes(self) -> PyTree:
        """Unboxed ``jax.ShapeDtypeStruct`` parameters: restore targets, import checks."""
        return jax.eval_shape(lambda: nn.unbox(
            self.init(jax.random.PRNGKey(0), self.dummy_batch(1, 8, 8))))

    def logits(self, params: PyTree, batch: dict[str, Array],
               dropout_rng: Array | None = None) -> Array:
        """[b, t, vocab] next-token logits for a batch (teacher forcing).

        Dropout is on when ``dropout_rng`` is given.
        """
        deterministic = dropout_rng is None
        rngs = None if deterministic else {"dropout": dropout_rng}
        return self.module.apply({"params": params}, batch, deterministic=deterministic,
                                 rngs=rngs)

    def loss(self, params: PyTree, batch: dict[str, Array], *, dropout_rng: Array | None,
             label_smoothing: float = 0.0, z_loss: float = 0.0,
             normalizer: Array | None = None, teacher_logits: Array | None = None,
             alpha: float = 0.0, temperature: float = 1.0,
             kd_ids: int | tuple[np.ndarray, np.ndarray] | None = None,
             kd_targets: np.ndarray | None = None) -> tuple[Array, dict]:
        """Mean loss per target token and summed metrics.

        With ``teacher_logits`` (token-level distillation) the loss per token is
        ``(1 - alpha) * CE + alpha * KD``, CE the smoothed cross entropy plus z-loss and
        KD :func:`distill_kl`'s ``T^2 * KL(teacher || student)``; the metrics add both
        terms' sums (``ce_sum``, ``kd_sum``). ``alpha`` = 0 trains on CE alone (KD is a
        metric, its gradient never computed); 1 on KD alone.

        Args:
          normalizer: what the summed loss is divided by; default this batch's target
            token count. Gradient accumulation passes the whole batch's count, so the
            microbatches' gradients add up to the full batch's.
          teacher_logits: [b, t, V_t] the teacher's logits of this batch (constant).
          alpha, temperature: ``DistillConfig``'s.
          kd_ids: :func:`distill_kl`'s ``ids``.
          kd_targets: [vocab] bools, the target ids distillation covers (a mapped
            vocabulary): adds ``kd_covered_sum``, the covered target tokens.
        """
        logits = self.logits(params, batch, dropout_rng)
        weights = batch["decoder_loss_weights"].astype(jnp.float32)
        targets = batch["decoder_target_tokens"]
        (total, zl, nll), tgt_logit, max_logit = _cross_entropy(
            logits, targets, weights, label_smoothing, z_loss)
        ntok = jnp.maximum(jnp.sum(weights), 1.0) if normalizer is None else normalizer
        # "The target's logit is a maximum": argmax == target except on exact ties, from
        # reductions the loss makes anyway. A separate argmax over [b, t, vocab] costs
        # ~0.14 s of a ~1.4 s step on the 2-core CPU (benchmarks/train_step.py).
        correct = jnp.sum((tgt_logit >= max_logit) * weights)
        metrics = {"loss_sum": total, "nll_sum": nll, "z_loss_sum": zl, "tokens": jnp.sum(weights),
                   "correct": correct}
        if teacher_logits is not None:
            teacher_logits = jax.lax.stop_gradient(teacher_logits)
            student = jax.lax.stop_gradient(logits) if alpha == 0 else logits
            kd = distill_kl(student, teacher_logits, weights, temperature, kd_ids)
            metrics.update(ce_sum=total, kd_sum=kd)
            if kd_targets is not None:
                metrics["kd_covered_sum"] = jnp.sum(jnp.asarray(kd_targets)[targets] * weights)
            if alpha == 1:
                total = kd
            elif alpha > 0:
                total = (1.0 - alpha) * total + alpha * kd
            metrics["loss_sum"] = total
        return total / ntok, metrics

    def score_batch(self, params: PyTree, batch: dict[str, Array]) -> Array:
        """Log-likelihood of each row's targets, [b] (T5X's ``score_batch``).

        Sums ``log p(target)`` over the tokens ``decoder_loss_weights`` selects (all of
        a packed row's segments), from the same fused statistics as the loss, so no
        [b, t, vocab] log-softmax is kept.
        """
        logits = self.logits(params, batch).astype(jnp.float32)
        log_z, tgt_logit, _, _ = _ce_stats(logits, batch["decoder_target_tokens"])  # [b, t]
        return jnp.sum((tgt_logit - log_z) * batch["decoder_loss_weights"], axis=-1)

    def lang_ids(self, batch: dict[str, Array]) -> decoding.LangIds:
        """A decode's adapter routing ids from ``batch``: (``encoder_lang_ids`` [b] or
        [b, s], ``decoder_lang_ids`` [b]); None without adapters (ids are ignored).

        Raises:
          ValueError: the model has adapters and a key is missing (naming it).
        """
        if not self.cfg.adapter.size:
            return None
        for k in LANG_KEYS:
            if batch.get(k) is None:
                raise ValueError(f"ModelConfig.adapter.size > 0: decoding routes the adapters "
                                 f"by the batch's '{k}' (an index into AdapterConfig.langs "
                                 f"per source row, -1 for none), which is missing")
        return tuple(jnp.asarray(batch[k], jnp.int32) for k in LANG_KEYS)

    def predict_batch(self, params: PyTree, batch: dict[str, Array],
                      decode_fn: Callable | None = None, **options) -> Array:
        """Greedy (or ``decode_fn``'s) target ids for a batch of sources (T5X's
        ``predict_batch``), without the :class:`DecodeConfig` processing.

        Args:
          params: the parameters (unboxed).
          batch: needs ``encoder_input_tokens``, [b, s] ids, 0-padded, each row ending
            in EOS, and with adapters ``encoder_lang_ids`` ([b] or [b, s]) and
            ``decoder_lang_ids`` ([b]); other keys are ignored.
          decode_fn: ``decode_fn(module, params, encoder_tokens, **options)``; default
            :func:`jaxmt.modeling.decoding.greedy_decode` (KV cache). With adapters it
            also gets ``lang_ids=(encoder ids, decoder ids)``.
          **options: the strategy's options, e.g. ``max_decode_len`` and ``num_ids``.

        Returns:
          What the strategy returns; greedy: [b, max_decode_len] ids, EOS then 0s after
          each row's end.
        """
        decode_fn = decoding.greedy_decode if decode_fn is None else decode_fn
        lang_ids = self.lang_ids(batch)
        if lang_ids is not None:
            options = dict(options, lang_ids=lang_ids)
        return decode_fn(self.module, params, batch["encoder_input_tokens"], **options)

    def predict_batch_with_aux(self, params: PyTree, batch: dict[str, Array],
                               decode: DecodeConfig, max_decode_len: int,
                               num_ids: int | None = None, rng: Array | None = None
                               ) -> tuple[Array, Array]:
        """Decodes a batch as ``decode`` says: greedy, beam search or sampling, with its
        length limits and logits processing.

        Args:
          params: the parameters (unboxed).
          batch: needs ``encoder_input_tokens``, [b, s] ids, 0-padded, rows ending in EOS,
            and with adapters ``encoder_lang_ids`` ([b] or [b, s]) and
            ``decoder_lang_ids`` ([b]), the routing ids of each source row.
          decode: the strategy and its settings.
          max_decode_len: the KV cache's length, the longest output possible.
          num_ids: only ids below this are generated (a vocabulary with fewer pieces
            than ``ModelConfig.vocab_size``).
          rng: sampling's key; default ``PRNGKey(decode.seed)``.

        Returns:
          ``(ids, scores)``: [b, n_best, max_decode_len] ids, best first (EOS then 0s
          after each output's end; no EOS where the length limit cut it off), and their
          [b, n_best] scores (beam search: length-penalised log-probabilities).
        """
        enc, lang_ids = batch["encoder_input_tokens"], self.lang_ids(batch)
        if decode.strategy == "beam":
            return beam_search(self.module, params, enc, max_decode_len, num_ids, decode,
                               lang_ids)
        return decoding.sample_decode(self.module, params, enc, max_decode_len, num_ids,
                                      decode, rng, lang_ids)
