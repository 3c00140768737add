"""Evaluation metrics of the WAUVE paper (Han et al., Cancer Imaging 2025), equal to pROC.

- ``roc``: AUC, the ROC curve, DeLong's variance and covariance, DeLong confidence
  interval of an AUC and DeLong's test of two paired AUCs (pROC ``auc``, ``coords``,
  ``var``, ``cov``, ``ci.auc``, ``roc.test``), with pROC's ``direction`` convention;
- ``threshold``: sensitivity, specificity, PPV, NPV and accuracy at a threshold with exact
  (Clopper-Pearson) intervals, F1, and the threshold that matches a target sensitivity;
- ``report``: all of them for several scores, overall and per subgroup, and the rows of
  the paper's Table 2;
- ``pooled``: the pooled ROC and AUC of several sites from per-site score histograms, for
  federated evaluation where no score leaves a site.
"""

from common.metrics.pooled import (
    bin_edges,
    histogram_counts,
    pooled_auc_from_histograms,
    pooled_roc_from_histograms,
)
from common.metrics.report import (
    TABLE_MEASURES,
    Comparison,
    GroupReport,
    Report,
    ScoreReport,
    build_report,
    comparison_rows,
    evaluate_by_group,
    evaluate_scores,
    operating_thresholds,
    resolve_directions,
)
from common.metrics.roc import (
    AucCI,
    DelongTest,
    Direction,
    ResolvedDirection,
    RocCurve,
    auc_ci,
    delong_covariance,
    delong_test,
    resolve_direction,
    roc_auc,
    roc_curve,
    roc_from_counts,
)
from common.metrics.threshold import (
    Proportion,
    SensitivityMatch,
    ThresholdMetrics,
    clopper_pearson,
    threshold_for_sensitivity,
    threshold_metrics,
)

__all__ = [
    "TABLE_MEASURES",
    "AucCI",
    "Comparison",
    "DelongTest",
    "Direction",
    "GroupReport",
    "Proportion",
    "Report",
    "ResolvedDirection",
    "RocCurve",
    "ScoreReport",
    "SensitivityMatch",
    "ThresholdMetrics",
    "auc_ci",
    "bin_edges",
    "build_report",
    "clopper_pearson",
    "comparison_rows",
    "delong_covariance",
    "delong_test",
    "evaluate_by_group",
    "evaluate_scores",
    "histogram_counts",
    "operating_thresholds",
    "pooled_auc_from_histograms",
    "pooled_roc_from_histograms",
    "resolve_direction",
    "resolve_directions",
    "roc_auc",
    "roc_curve",
    "roc_from_counts",
    "threshold_for_sensitivity",
    "threshold_metrics",
]
