"""Linear probes of what a thought holds, judged only on held-out problems.

:mod:`latentpatch.probing.probes` fits and scores probes (grouped cross-validation, majority /
random-vector / control-task baselines, selectivity, cluster-bootstrap CIs);
:mod:`latentpatch.probing.controls` holds the pieces those checks are built from. numpy and
scikit-learn only: no torch.
"""
