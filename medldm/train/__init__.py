"""Training: ``train(config, out_dir)`` runs the stages a config asks for (``medldm train`` is a thin CLI).

Layout of OUT_DIR::

    config.yaml             resolved config of the run
    cache/                  PersistentDataset cache (data.cache: disk)
    vae/  checkpoint/ model/ train_log.csv val_log.csv images/ [tb/]
    ldm/  checkpoint/ model/ latents.safetensors train_log.csv val_log.csv images/ [tb/]
    refine/ (sr, denoise with refine.enabled) checkpoint/ model/ train_log.csv val_log.csv images/
    model/                  THE final model folder (links to the last stage's model)
    summary.json            final validation metrics

``OUT_DIR/model`` (VAE + U-Net + EMA U-Net [+ refiner]) is what ``medldm enhance`` / ``medldm synthesize`` load;
``OUT_DIR/vae/model`` holds the autoencoder alone.
"""

from medldm.train.runner import train

__all__ = ["train"]
