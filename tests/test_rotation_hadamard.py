"""SpinQuant's Hadamard matrices against torchao's SpinQuant utilities (torchao 0.18).

aot.quant.rotation takes its 12 and 20 factors from torchao's tables; these tests hold them, bit for
bit, to the Paley construction they replaced, so model.pte keeps its bytes. torchao's whole-matrix
helpers are not used, and the tests pin why: `hadamard_matrix` is float32, `random_hadamard_matrix`
scales by a float32 sqrt(n) (equal bits only where n is a power of 4), puts the random signs on the
rows (the transpose, which differs from ours for 12*2^k sizes such as the 3B's 3072), and reseeds per
call (our R2 of each layer continues R1's generator)."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from aot.quant.rotation import hadamard, hadamard_factors, random_rotations, random_signs

pytestmark = pytest.mark.oracle


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: a (q+1)x(q+1) +-1 Hadamard matrix from the quadratic residues mod q."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if i in squares else -1.0 for i in range(1, q)], dtype=torch.float64)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0] = 1.0, -1.0
    s[1:, 1:] = torch.stack([chi[(torch.arange(q) - i) % q] for i in range(q)])  # Q[i, j] = chi(j - i)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _torchao():
    with contextlib.redirect_stdout(io.StringIO()):  # the module prints a NOTE when imported
        from torchao.prototype.spinquant import hadamard_utils
    return hadamard_utils


@pytest.mark.parametrize("m", [12, 20])
def test_torchaos_factor_tables_are_the_paley_matrices(m):
    h, k = _torchao().get_hadK(m, transpose=True)
    assert k == m and torch.equal(h.double(), _paley(m - 1))


@pytest.mark.parametrize("n", [384, 320, 3072])  # tiny FFN, a 20*2^k size, the 3B's dim
def test_hadamard_is_the_kronecker_product_bit_for_bit(n):
    m, p = hadamard_factors(n)
    want = torch.kron(_paley(m - 1), _sylvester(p)) / n**0.5
    got = hadamard(n)
    assert got.dtype == torch.float64 and torch.equal(got, want)


@pytest.mark.parametrize("n", [64, 128, 2048])  # 1B head_dim, 3B head_dim, 1B dim
def test_power_of_two_sizes_match_torchao_up_to_its_float32_scale(n):
    ta = _torchao()
    had, k = ta.get_hadK(n)
    theirs = ta.matmul_hadU_slow(torch.eye(n, dtype=torch.float64), had, k)
    assert torch.equal(hadamard(n) * n**0.5, _sylvester(n))
    # torchao divides by torch.tensor(n).sqrt(), a float32: equal bits only where that is exact.
    assert (theirs - hadamard(n)).abs().max().item() < 1e-8
    assert torch.equal(theirs, hadamard(n)) == (float(torch.tensor(n).sqrt()) == n**0.5)
    # Its random Hadamard draws the same signs from the same seed, on the rows.
    g = torch.Generator().manual_seed(7)
    ours = hadamard(n) * random_signs(n, g)[None, :]
    assert (ta.random_hadamard_matrix(n, "cpu", seed=7).T - ours).abs().max().item() < 1e-8


def test_torchaos_random_hadamard_is_not_ours_for_12_times_2k_sizes_nor_our_r2_sequence():
    from types import SimpleNamespace

    ta = _torchao()
    rot = random_rotations(SimpleNamespace(dim=384, head_dim=64, n_layers=2), seed=0)
    assert (ta.random_hadamard_matrix(384, "cpu", seed=0).T - rot.r1).abs().max().item() > 0.05
    assert not torch.equal(rot.r2[0], rot.r2[1])  # each layer its own signs; torchao would repeat seed 0's


def test_the_factor_lookup_prints_nothing_on_stdout(capsys):
    hadamard(384)
    assert capsys.readouterr().out == ""
