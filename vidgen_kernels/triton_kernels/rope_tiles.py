"""Triton device helpers shared by the attention kernels that rotate q/k tiles on the fly
(``temporal_attention.py``, ``rope3d_attention.py``).

A row of ``D`` elements is handled as its two rotation-pair halves ``(a, b)`` of ``D/2`` columns
each: pairs ``(x[2i], x[2i+1])`` when ``INTERLEAVED``, ``(x[i], x[i + D/2])`` otherwise (the
conventions of ``vidgen_kernels/ops/rope.py``). Then ``q . k = qa . ka + qb . kb``, so the scores
need no re-interleaving. Without ``ROPE`` the full row is loaded once as ``a`` (``b`` aliases it).
"""
import triton
import triton.language as tl


@triton.jit
def load_pair(X, row_off, row_ok, d_full, d_half, sd, D, HALF,
               ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows of X as (a, b): the two members of each rotation pair when ROPE, else (x, x)."""
    if not ROPE:
        x = tl.load(X + row_off[:, None] + d_full[None, :] * sd,
                    mask=row_ok[:, None] & (d_full[None, :] < D), other=0.0)
        return x, x
    elif INTERLEAVED:
        x = tl.load(X + row_off[:, None] + d_full[None, :] * sd,
                    mask=row_ok[:, None] & (d_full[None, :] < D), other=0.0)
        a, b = tl.split(tl.reshape(x, [x.shape[0], BLOCK_H, 2]))
        return a, b
    else:
        m = row_ok[:, None] & (d_half[None, :] < HALF)
        a = tl.load(X + row_off[:, None] + d_half[None, :] * sd, mask=m, other=0.0)
        b = tl.load(X + row_off[:, None] + (d_half[None, :] + HALF) * sd, mask=m, other=0.0)
        return a, b


@triton.jit
def store_pair(X, row_off, row_ok, d_full, d_half, sd, D, HALF, a, b,
                ROPE: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_D: tl.constexpr):
    """Inverse of :func:`load_pair` (``b`` is ignored without ROPE)."""
    if not ROPE:
        tl.store(X + row_off[:, None] + d_full[None, :] * sd, a,
                 mask=row_ok[:, None] & (d_full[None, :] < D))
    elif INTERLEAVED:
        x = tl.reshape(tl.join(a, b), [a.shape[0], BLOCK_D])
        tl.store(X + row_off[:, None] + d_full[None, :] * sd, x,
                 mask=row_ok[:, None] & (d_full[None, :] < D))
    else:
        m = row_ok[:, None] & (d_half[None, :] < HALF)
        tl.store(X + row_off[:, None] + d_half[None, :] * sd, a, mask=m)
        tl.store(X + row_off[:, None] + (d_half[None, :] + HALF) * sd, b, mask=m)


@triton.jit
def pair_scores(qa, qb, ka, kb, ROPE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores ``q k^T`` of rows held as pair halves (or as full rows without ROPE)."""
    s = tl.dot(qa, tl.trans(ka), input_precision=DOT_PREC)
    if ROPE:
        s += tl.dot(qb, tl.trans(kb), input_precision=DOT_PREC)
    return s



@triton.jit
def masked_probs(z, visible, lse2):
    """Softmax probabilities of a (query block, key block) tile in the backward, from its scores
    ``z`` and the rows' log-sum-exp ``lse2`` (both log2 units): ``exp2(z - lse2)``, 0 where not
    ``visible`` (fp32)."""
    return tl.where(visible, tl.exp2(z - lse2[:, None]), 0.0)


@triton.jit
def whole_row_probs_ds(z, visible, lse2, do, v, DOT_PREC: tl.constexpr):
    """``(p, ds)`` of a tile that holds every key its rows see (the resident kernels): ``p`` of
    :func:`masked_probs` renormalised over each row, ``ds = p * (dp - delta)`` with ``delta =
    sum_j p dp`` of that same ``p`` (fp32), 0 where not ``visible``. Then ``sum_j ds`` is 0 to
    rounding, as it is exactly; ``delta = rowsum(dout * out)`` (:func:`masked_ds`) with a 16-bit
    ``out``, or ``p`` summing to 1 only to the last bit of ``lse``, leave a row error
    ``eps`` that dq keeps as ``eps * sum_j p k_j``: large where the keys share a large common
    component (fp16 dq 50x the reference's error at a common key offset of 30). A NaN in a row
    makes the row's visible entries NaN; a row with no visible key is 0."""
    p = masked_probs(z, visible, lse2)
    psum = tl.sum(p, axis=1)
    p = tl.where(visible, p / tl.where(psum == 0.0, 1.0, psum)[:, None], 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    delta = tl.sum(tl.where(visible, p * dp, 0.0), axis=1)
    return p, tl.where(visible, p * (dp - delta[:, None]), 0.0)


@triton.jit
def masked_ds(p, visible, do, v, delta, DOT_PREC: tl.constexpr):
    """The tile's score gradient ``ds = p * (dout v^T - delta)`` (fp32), ``delta = rowsum(dout *
    out)``; 0 where not ``visible``: ``where``, not a product, so a NaN dp / delta reaches no key
    the query cannot see."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    return tl.where(visible, p * (dp - delta[:, None]), 0.0)
