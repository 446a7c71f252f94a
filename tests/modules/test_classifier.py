"""ImageClassifier: trains like the whole image, logs loss and metrics, predicts logits and maps."""

from __future__ import annotations

import copy

import torch
from torchmetrics.classification import MulticlassAccuracy

from lightstream.modules import ImageClassifier
from streaming_helpers import (TILE, image_data, loader, max_difference, quiet_trainer, tiny_head, tiny_trunk,
                               whole_image_sgd)


class _SGDClassifier(ImageClassifier):
    def configure_optimizers(self):
        return torch.optim.SGD(self.get_trainable_params(), lr=self.lr)


def test_one_step_equals_whole_image_training_and_metrics_are_logged() -> None:
    trunk, head = tiny_trunk(), tiny_head()
    data = image_data(4)
    model = _SGDClassifier(copy.deepcopy(trunk), copy.deepcopy(head), TILE, lr=0.5,
                           metrics={"acc": MulticlassAccuracy(num_classes=3, average="micro")})
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, loader(data, 2))
    assert {"train_loss", "train_acc_step"} <= set(trainer.callback_metrics)

    ref_trunk, ref_head = whole_image_sgd(trunk, head, [data[:2]], 0.5)
    assert max_difference(model.stream_network.stream_module, ref_trunk) <= 1e-10
    assert max_difference(model.head, ref_head) <= 1e-10

    images, targets = data[:4]
    logits = ref_head(ref_trunk(images))
    metrics = trainer.validate(model, loader(data, 4), verbose=False)[0]
    assert set(metrics) == {"val_loss", "val_acc"}
    assert abs(metrics["val_loss"] - torch.nn.functional.cross_entropy(logits, targets).item()) <= 1e-10
    expected_accuracy = (logits.argmax(1) == targets).double().mean().item()
    assert abs(metrics["val_acc"] - expected_accuracy) <= 1e-6


def test_predict_returns_logits_and_optionally_the_feature_map() -> None:
    trunk, head = tiny_trunk(), tiny_head()
    data = image_data(3)
    images = data.tensors[0]
    expected_map = trunk.eval()(images)
    for with_map in (False, True):
        model = ImageClassifier(copy.deepcopy(trunk), copy.deepcopy(head), TILE, predict_feature_map=with_map)
        batches = quiet_trainer().predict(model, loader(data, 3))
        logits, feature_map = batches[0] if with_map else (batches[0], None)
        assert (logits - head(expected_map)).abs().max() <= 1e-10
        if with_map:
            assert (feature_map - expected_map).abs().max() <= 1e-10


def test_the_default_optimiser_holds_the_trainable_parameters() -> None:
    model = ImageClassifier(tiny_trunk(), tiny_head(), TILE, train_streaming_layers=False, lr=3e-3)
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 3e-3
    assert optimizer.param_groups[0]["params"] == list(model.head.parameters())


def test_load_from_checkpoint_restores_the_arguments_given_the_modules(tmp_path) -> None:
    model = ImageClassifier(tiny_trunk(), tiny_head(), TILE, lr=0.01, mean=(0.1, 0.2, 0.3), std=(2.0, 2.0, 2.0),
                            predict_feature_map=True)
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, loader(image_data(2), 2))
    trainer.save_checkpoint(tmp_path / "model.ckpt")

    restored = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt", stream_network=tiny_trunk(seed=7),
                                                    head=tiny_head(seed=8))
    assert restored.lr == 0.01 and restored.predict_feature_map
    assert restored.stream_network.tile_size == (TILE, TILE)
    assert torch.equal(restored.stream_network.mean, torch.tensor([0.1, 0.2, 0.3]))
    assert max_difference(restored, model) == 0  # the weights come from the checkpoint
