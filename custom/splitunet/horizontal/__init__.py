"""The horizontal FedAvg baseline: hospitals that each hold every modality and the labels of their own patients
train the split job's U-Net with FLARE's own FedAvg workflow and PyTorch persistor (job ``fedavg_unet``).

It is the reference the split-learning topologies are compared against, so everything that decides what is learned
is the split job's: the model (:class:`FedAvgUNet`), the loss, the crops, the optimiser, and Dice per region.

The job config names the short paths ``splitunet.horizontal.FedAvgHospitalExecutor`` (hospitals) and
``splitunet.horizontal.FedAvgUNet`` (the server's model component). Each class loads on first use (see
:mod:`splitunet.lazy_exports`): the server's persistor builds the model without loading FLARE's client side here.
"""

from splitunet.lazy_exports import lazy_exports

# What the FedAvg job builds beyond FLARE's default allow-list: the hospitals' executor, the model the server's
# persistor builds, and the persistor itself (FLARE 2.9's default list lacks it). A workspace's class_allow_list
# (local/resources.json) must name them; they are plain strings, so reading them loads neither torch nor FLARE.
HOSPITAL_CLASSES = (
    "splitunet.horizontal.FedAvgHospitalExecutor",
    "splitunet.horizontal.FedAvgUNet",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    # The server's workflow of fedavg_unet_dwcs: FLARE's FedAvg with DWCS on each round's global model.
    "splitunet.horizontal.DriftCorrectedFedAvg",
)

_EXPORTS = {
    "FedAvgUNet": "model",
    "LocalSettings": "local_trainer",
    "LocalRound": "local_trainer",
    "LocalTrainer": "local_trainer",
    "FedAvgHospitalExecutor": "executor",
    "CaseCrops": "case_crops",
    "DriftCorrectedFedAvg": "drift_corrected_fedavg",
}
__all__ = sorted([*_EXPORTS, "HOSPITAL_CLASSES"])
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
