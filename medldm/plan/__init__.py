"""Planning a training run from the data (nnU-Net's experiment planning, for latent diffusion): the dataset
fingerprint (:mod:`~medldm.plan.fingerprint`), its integrity check (:mod:`~medldm.plan.check`), one ``decide_*``
function per decision (:mod:`~medldm.plan.decisions`), the split by subject (:mod:`~medldm.plan.split`), the
memory model and measured step (:mod:`~medldm.plan.memory`) and PLAN.yaml with the reasons
(:mod:`~medldm.plan.write`). It sits above ``train`` and ``eval`` (it measures a training step and writes an HTML
page) and below ``cli``; nothing else imports it."""
