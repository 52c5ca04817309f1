"""Terms that join a GAN's adversarial loss: AC-GAN's auxiliary class loss and BigGAN's orthogonal regularisation.
Per-sample (or per-network) values; the script weights and reduces them."""

import torch
import torch.nn.functional as F
from torch import nn

from modelling.common import at_least_fp32


# AC-GAN: Odena et al. 2017, arXiv 1610.09585, Sec. 3, Eqs. 2-3: L_C = E[log P(C = c | X_real)] + E[log P(C = c |
# X_fake)]; D maximises L_S + L_C, G maximises L_C - L_S. As losses to minimise: D adds the class cross-entropy on
# reals (their labels) and on fakes (the labels they were drawn for), G adds the one on fakes.
class AuxClassifierLoss:
    """Class cross-entropy -log softmax(logits)[label], per sample (N,), computed in fp32."""

    @staticmethod
    def cross_entropy(class_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(at_least_fp32(class_logits), labels, reduction="none")

    def d_loss(self, c_reals, c_fakes, real_labels, fake_labels) -> torch.Tensor:
        return self.cross_entropy(c_reals, real_labels) + self.cross_entropy(c_fakes, fake_labels)

    def g_loss(self, c_fakes, fake_labels) -> torch.Tensor:
        return self.cross_entropy(c_fakes, fake_labels)


# BigGAN: Brock et al. 2019, arXiv 1809.11096, Sec. 3.1, Eq. 3 ("modified" orthogonal regularisation): R_beta(W) =
# beta * ||W^T W (.) (1 - I)||_F^2 over the filters of every weight W (rows of W reshaped to (out, fan_in); the
# Gram matrix of the filters, diagonal removed: norms are free, directions pushed apart). Ref: BigGAN-PyTorch
# utils.ortho, which adds the gradient 2 beta ((W W^T) (.) (1 - I)) W directly: that is the gradient of beta / 2 *
# the norm above, so its --G_ortho s equals this paper beta = s / 2. Autograd differentiates ours: 4 beta (...) W.
def orthogonal_penalty(module: nn.Module, skip: tuple[str, ...] = ("shared.",)) -> torch.Tensor:
    """sum over parameters with >= 2 dims (names not starting with `skip`: BigGAN exempts its shared embedding) of
    ||W W^T (.) (1 - I)||_F^2, W reshaped to (out, -1). Spectrally normalised layers contribute their raw weight
    (the `original` parameter), as in BigGAN-PyTorch. fp32, outside autocast. A tall W (more filters than inputs)
    takes the identity ||W W^T (.) (1 - I)||^2 = ||W^T W||^2 - sum_i ||w_i||^4, which never forms the (out, out)
    Gram matrix (65,536 x 65,536 for a 4 x 4 x 4096 dense layer)."""
    total = None
    for name, param in module.named_parameters():
        if param.ndim < 2 or name.startswith(skip):
            continue
        with torch.autocast(param.device.type, enabled=False):
            w = at_least_fp32(param).flatten(1)  # (out, fan_in): one filter per row
            if w.shape[0] <= w.shape[1]:
                gram = w @ w.T  # (out, out)
                term = (gram - torch.diag_embed(gram.diagonal())).square().sum()
            else:  # ||W W^T||_F = ||W^T W||_F: the (fan_in, fan_in) Gram, e.g. BigGAN's z-chunk -> 4x4 dense layer
                term = (w.T @ w).square().sum() - w.square().sum(dim=1).square().sum()
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
