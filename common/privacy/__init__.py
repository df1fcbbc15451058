"""Differential privacy: the accountant, the Gaussian mechanism for released statistics, DP-SGD, and the
randomness they draw from.

Why a package of its own: the site (client_app) uses all of it to release adapters and class means; the
server uses the accountant and the mechanisms for central DP. Nothing here reads the configuration: each
function takes the numbers it needs.
"""

from common.privacy.accounting import ACCOUNTANTS, Release, calibrate_noise, epsilon
from common.privacy.mechanisms import gaussian_release, noisy_class_means, noisy_counts, target_basis
from common.privacy.secure import secure_generator

__all__ = ["ACCOUNTANTS", "Release", "calibrate_noise", "epsilon", "gaussian_release", "noisy_class_means",
           "noisy_counts", "secure_generator", "target_basis"]
