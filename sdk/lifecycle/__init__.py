"""The run's life around the training loop: stop signals and the deadline (:mod:`~sdk.lifecycle.preemption`), ranks
agreeing to stop and save (:mod:`~sdk.lifecycle.agreement`), what the child tells its supervisor
(:mod:`~sdk.lifecycle.childreport`), and the run record kept beside the artifacts (:mod:`~sdk.lifecycle.runrecord`).
"""
