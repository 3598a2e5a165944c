"""Cascade decode attention: decode_attention with a row map and an lse output, and
merge_attention. A prefix call (G query rows reading one shared cache row) + a suffix
call (each row's own cache) + the merge must equal one attention over the concatenated
keys, on the reference and on the Triton kernel (CPU interpreted, CUDA native).
"""
import pytest
import torch

import medlvr
from devices import backend_devices, triton_devices
from medlvr.ops.decode import decode_attention, merge_attention
from medlvr.reference import decode as ref

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _poisoned(rows, Hkv, L, Dh, lengths, dtype, g):
    c = torch.randn(rows, Hkv, L, Dh, generator=g).to(dtype)
    for r, n in enumerate(lengths):
        c[r, :, n:] = float("nan")  # never read past a row's length
    return c


def _lse_want(q, kc, lens, rows):
    """log sum exp of the scaled scores, straight from the definition (fp64)."""
    B, Hq, Dh = q.shape
    Hkv = kc.shape[1]
    out = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        if n == 0:
            continue
        k = kc[int(rows[b]), :, :n].double().repeat_interleave(Hq // Hkv, 0)  # (Hq, n, Dh)
        s = (k @ q[b].double()[:, :, None])[..., 0] * Dh ** -0.5
        out[b] = torch.logsumexp(s, -1)
    return out


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_row_map_and_lse(backend, device, dtype, splits):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Dh, L = 5, 4, 2, 16, 70
    prefix_len = [70, 0, 33]  # 3 cache rows (one empty) shared by 5 query rows
    kc = _poisoned(3, Hkv, L, Dh, prefix_len, dtype, g)
    vc = _poisoned(3, Hkv, L, Dh, prefix_len, dtype, g)
    q = torch.randn(B, Hq, Dh, generator=g).to(dtype)
    rows = torch.tensor([0, 0, 2, 1, 2], dtype=torch.int32)
    lens = torch.tensor([prefix_len[r] for r in rows.tolist()], dtype=torch.int32)
    want_o = ref.decode_attention(q.float(), kc.float()[rows.long()], vc.float()[rows.long()], lens)
    want_lse = _lse_want(q.float(), kc.float(), lens, rows)
    dev = [t.to(device) for t in (q, kc, vc, lens, rows)]
    with medlvr.force_backend(backend):
        o, lse = decode_attention(*dev[:4], rows=dev[4], num_splits=splits, return_lse=True)
    assert lse.shape == (B, Hq) and o.dtype == dtype
    assert torch.equal(o[3].cpu(), torch.zeros_like(o[3].cpu())) and bool(torch.isneginf(lse[3]).all())
    torch.testing.assert_close(o.float().cpu(), want_o, **TOL[dtype])
    fin = torch.isfinite(want_lse)
    # lse of the fp32-upcast inputs; bf16 q/k differ from them only by the input rounding
    torch.testing.assert_close(lse.cpu().double()[fin], want_lse[fin], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_plus_suffix_merge_equals_full_attention(backend, device, dtype):
    """Cascade = one attention over [prefix of the row's prompt; the row's own suffix]."""
    g = torch.Generator().manual_seed(1)
    P, G, Hq, Hkv, Dh, Lp, Ls = 2, 3, 6, 2, 24, 67, 9
    B = P * G
    plen = [67, 20]
    slen = [0, 4, 9, 1, 9, 3]  # a row with no suffix yet (first latent step) included
    pk, pv = (_poisoned(P, Hkv, Lp, Dh, plen, dtype, g) for _ in range(2))
    sk, sv = (_poisoned(B + 1, Hkv, Ls, Dh, slen + [0], dtype, g) for _ in range(2))
    q = torch.randn(B, Hq, Dh, generator=g).to(dtype)
    rows = torch.arange(B) // G
    # the same rows as independent caches holding [prefix; suffix]
    full_k = torch.zeros(B, Hkv, Lp + Ls, Dh)
    full_v = torch.zeros_like(full_k)
    full_len = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        n, m = plen[rows[b]], slen[b]
        full_k[b, :, :n], full_k[b, :, n:n + m] = pk[rows[b], :, :n].float(), sk[b, :, :m].float()
        full_v[b, :, :n], full_v[b, :, n:n + m] = pv[rows[b], :, :n].float(), sv[b, :, :m].float()
        full_len[b] = n + m
    want = ref.decode_attention(q.float(), full_k, full_v, full_len)
    to = lambda t: t.to(device)  # noqa: E731
    with medlvr.force_backend(backend):
        o1, l1 = decode_attention(to(q), to(pk), to(pv), to(torch.tensor(plen)[rows]), rows=to(rows),
                                  return_lse=True, num_splits=2)
        o2, l2 = decode_attention(to(q), to(sk), to(sv), to(torch.tensor(slen)), return_lse=True)
        got = merge_attention(o1, l1, o2, l2)
    torch.testing.assert_close(got.float().cpu(), want, **TOL[dtype])


def test_merge_empty_sets_and_out_buffer():
    o_a, o_b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ninf = torch.full((2, 3), float("-inf"))
    lse = torch.randn(2, 3)
    assert torch.equal(merge_attention(o_a, lse, o_b, ninf), o_a)  # empty B: A alone, exactly
    assert torch.equal(merge_attention(o_a, ninf, o_b, lse), o_b)
    out = torch.full_like(o_a, float("nan"))
    res = merge_attention(o_a, ninf, o_b, ninf, out=out)
    assert res is out and torch.equal(out, torch.zeros_like(out))  # both empty: 0, never NaN
    # equal lse: the plain average
    torch.testing.assert_close(merge_attention(o_a, lse, o_b, lse), (o_a + o_b) / 2)


@pytest.mark.parametrize("device", triton_devices())
def test_kernel_clamps_rows_to_the_cache(device):
    from medlvr.ops.decode import _kernels

    g = torch.Generator().manual_seed(2)
    kc, vc = torch.randn(2, 1, 8, 16, generator=g), torch.randn(2, 1, 8, 16, generator=g)
    q = torch.randn(2, 2, 16, generator=g)
    lens = torch.tensor([8, 8])
    bad = torch.tensor([1, 5])
    with pytest.raises(ValueError, match="rows"):
        decode_attention(q, kc, vc, lens, rows=bad)  # CPU calls are checked
    with medlvr.force_backend("triton"):
        got = _kernels("decode_attention").decode_attention(*(t.to(device) for t in (q, kc, vc, lens)),
                                                            rows=bad.to(device), num_splits=1)
    want = ref.decode_attention(q, kc, vc, lens, rows=torch.tensor([1, 1]))
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32])


@pytest.mark.parametrize("patch,err,match", [
    (lambda a: a.update(rows=a["rows"].float()), TypeError, "rows"),
    (lambda a: a.update(rows=a["rows"][:1]), ValueError, "rows"),
    (lambda a: a.update(rows=torch.tensor([0, -1, 0])), ValueError, "rows"),
    (lambda a: a.update(return_lse=1), TypeError, "return_lse"),
])
def test_bad_row_map(patch, err, match):
    a = dict(q=torch.randn(3, 2, 8), k_cache=torch.randn(1, 1, 4, 8), v_cache=torch.randn(1, 1, 4, 8),
             lengths=torch.tensor([4, 2, 0]), rows=torch.zeros(3, dtype=torch.long))
    patch(a)
    with pytest.raises(err, match=match):
        decode_attention(a.pop("q"), a.pop("k_cache"), a.pop("v_cache"), a.pop("lengths"), **a)


@pytest.mark.parametrize("patch,match", [
    (lambda a: a.update(o_b=a["o_b"][:1]), "o_b"),
    (lambda a: a.update(o_b=a["o_b"].double()), "o_b"),
    (lambda a: a.update(lse_a=a["lse_a"][:, :1]), "lse_a"),
    (lambda a: a.update(lse_b=a["lse_b"][0]), "lse_b"),
    (lambda a: a.update(out=torch.empty(2, 3, 5)), "out"),
])
def test_bad_merge(patch, match):
    a = dict(o_a=torch.randn(2, 3, 4), lse_a=torch.randn(2, 3), o_b=torch.randn(2, 3, 4), lse_b=torch.randn(2, 3))
    patch(a)
    with pytest.raises((ValueError, TypeError), match=match):
        merge_attention(a.pop("o_a"), a.pop("lse_a"), a.pop("o_b"), a.pop("lse_b"), **a)
