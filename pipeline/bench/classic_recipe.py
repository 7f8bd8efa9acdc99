"""The classic Keras recipe the pipeline is measured against (`make bench`), as users write it.

From the keras-io "fine-tune InceptionV3 on a new set of classes" example and
the Keras blog's small-data tutorial: ImageDataGenerator with augmentation fed
straight into fit(), InceptionV3 with a frozen base and a new head (pooling,
Dense 1024 relu, softmax) trained with rmsprop, then everything after `mixed8`
(the top two inception blocks) unfrozen and fine-tuned with SGD(1e-4, momentum
0.9). No determinism settings, no image check, no resume. With
`--checkpoint-dir` it also saves as the users' own script does (the seed note):
a full-model `ModelCheckpoint` every epoch (Keras 3's spelling of the seed's
`transfer_{epoch:02d}-{val_acc:.2f}.ckpt`, `period=1`) and a final
`model.save(...h5)`. The base starts from `--weights` (the bench's own
pretrained base, pipeline/bench/pretrained_base.py) or random weights, because
the bench runs offline; the recipe is otherwise as written.

    python -m pipeline.bench.classic_recipe DATA_DIR [--image-size 150] [--head-epochs 10] [--finetune-epochs 5]
                                               [--checkpoint-dir DIR] [--weights FILE]

Prints one JSON line: seconds inside the script, last validation accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The recipe's usual augmentation (the blog's and most tutorials' values).
AUGMENTATION = {
    "rotation_range": 30,
    "width_shift_range": 0.2,
    "height_shift_range": 0.2,
    "shear_range": 0.2,
    "zoom_range": 0.2,
    "horizontal_flip": True,
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="folder with train/<class>/ and validation/<class>/")
    parser.add_argument("--image-size", type=int, default=150, help="pixels, square")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--checkpoint-dir", help="save a full model every epoch here, and the final .h5 beside it")
    parser.add_argument("--weights", help="a no-top InceptionV3 weights file for the base (default: random init)")
    return parser.parse_args(argv)


def make_generators(data_dir: str, image_size: int, batch_size: int):
    from tensorflow.keras.applications.inception_v3 import preprocess_input
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    size = (image_size, image_size)
    train = ImageDataGenerator(preprocessing_function=preprocess_input, **AUGMENTATION).flow_from_directory(
        os.path.join(data_dir, "train"), target_size=size, batch_size=batch_size, class_mode="categorical"
    )
    validation = ImageDataGenerator(preprocessing_function=preprocess_input).flow_from_directory(
        os.path.join(data_dir, "validation"),
        target_size=size,
        batch_size=batch_size,
        class_mode="categorical",
        shuffle=False,
    )
    return train, validation


def build_classic_model(n_classes: int, image_size: int, weights: str | None = None):
    from tensorflow.keras import Model, layers
    from tensorflow.keras.applications import InceptionV3

    # The example's weights="imagenet", from a file when the bench brings its own pretrained base
    base = InceptionV3(weights=weights, include_top=False, input_shape=(image_size, image_size, 3))
    x = layers.GlobalAveragePooling2D()(base.output)
    x = layers.Dense(1024, activation="relu")(x)
    outputs = layers.Dense(n_classes, activation="softmax")(x)
    return Model(base.input, outputs), base


def train_classic(args) -> dict:
    import tensorflow as tf
    from tensorflow.keras.optimizers import SGD

    tf.keras.utils.set_random_seed(args.seed)
    train, validation = make_generators(args.data_dir, args.image_size, args.batch_size)
    model, base = build_classic_model(train.num_classes, args.image_size, args.weights)
    for layer in base.layers:
        layer.trainable = False
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    callbacks = []
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        callbacks.append(
            tf.keras.callbacks.ModelCheckpoint(
                os.path.join(args.checkpoint_dir, "transfer_{epoch:02d}-{val_accuracy:.2f}.keras"),
                monitor="val_accuracy",
                save_weights_only=False,
                mode="auto",
                save_freq="epoch",
            )
        )
    history = model.fit(train, epochs=args.head_epochs, validation_data=validation, callbacks=callbacks, verbose=2)
    if args.finetune_epochs:
        names = [layer.name for layer in base.layers]
        top = names.index("mixed8") + 1
        for layer in base.layers[top:]:
            layer.trainable = True
        model.compile(
            optimizer=SGD(learning_rate=1e-4, momentum=0.9), loss="categorical_crossentropy", metrics=["accuracy"]
        )
        history = model.fit(
            train,
            initial_epoch=args.head_epochs,
            epochs=args.head_epochs + args.finetune_epochs,
            validation_data=validation,
            callbacks=callbacks,
            verbose=2,
        )
    if args.checkpoint_dir:
        model.save(os.path.join(args.checkpoint_dir, "my_saved_InceptionV3_model.h5"))
    return {"val_accuracy": float(history.history["val_accuracy"][-1])}


def main(argv=None) -> int:
    started = time.time()
    result = train_classic(parse_args(argv))
    print(json.dumps({**result, "seconds": round(time.time() - started, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
