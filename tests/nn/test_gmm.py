"""The GMM head of Divot-LLM: parameter count, the k = 1 NLL against a Gaussian by hand, the clamp,
the mean prediction."""

import math

import pytest
import torch

from tokenizers_vis.nn.gmm import GMMHead, gmm_log_prob, gmm_mean_prediction, gmm_nll, split_gmm_params


@pytest.mark.parametrize("k,d", [(1, 4), (3, 16), (16, 8)])
def test_output_size_is_2kd_plus_k(k, d):
    head = GMMHead(12, k, d)
    params = head(torch.randn(2, 5, 12))
    assert head.num_outputs == 2 * k * d + k and params.shape == (2, 5, 2 * k * d + k)
    means, variances, logits = head.split(params)
    assert means.shape == variances.shape == (2, 5, k, d) and logits.shape == (2, 5, k)
    assert bool((variances >= 1e-5).all())


def test_single_component_nll_is_the_gaussian_nll_by_hand():
    torch.manual_seed(0)
    d = 6
    mean, raw_var, target = torch.randn(3, d), torch.randn(3, d), torch.randn(3, d)
    params = torch.cat([mean, raw_var, torch.randn(3, 1)], dim=-1)  # the logit of one component is irrelevant
    var = torch.nn.functional.softplus(raw_var)
    by_hand = 0.5 * (((target - mean) ** 2 / var) + var.log() + math.log(2 * math.pi)).sum(-1)  # per token
    nll = gmm_nll(*split_gmm_params(params, 1, d), target)
    torch.testing.assert_close(nll, by_hand.mean() / d)
    dist = torch.distributions.Normal(mean, var.sqrt())
    torch.testing.assert_close(gmm_log_prob(*split_gmm_params(params, 1, d), target), dist.log_prob(target).sum(-1))


def test_variance_clamp_and_mixture_weights():
    k, d = 2, 3
    params = torch.cat([torch.tensor([[0.0] * d + [2.0] * d]), torch.full((1, k * d), -50.0),
                        torch.tensor([[0.0, math.log(3.0)]])], dim=-1)
    means, variances, logits = split_gmm_params(params, k, d)
    assert torch.equal(variances, torch.full_like(variances, 1e-5))
    torch.testing.assert_close(gmm_mean_prediction(means, logits), torch.full((1, d), 1.5))
    with pytest.raises(ValueError, match="parameters"):
        split_gmm_params(params[..., :-1], k, d)
