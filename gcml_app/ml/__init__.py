"""The machine learning: networks, DCML, evaluation, the gate, transforms and the fixed split.

Pure ML: nothing here imports HTTP, MONAI Label, the model store or the round.

- :mod:`.network`: MONAI's UNet / SegResNet with the decoder feature tap and the projection head;
- :mod:`.dcml`: the training steps (supervised, DCML) and their epoch loops;
- :mod:`.evaluate`: sliding-window Dice per case and per label;
- :mod:`.gate`: the paired validation gate;
- :mod:`.transforms`: the preprocessing of training, validation and inference;
- :mod:`.split`: the fixed train/validation split of a site's labelled cases.
"""
