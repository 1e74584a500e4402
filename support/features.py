"""The networks that turn images into features for the metrics (metrics.py).

    inception:PATH    pytorch-fid's port of TF "inception-2015-12-05" (FID, IS, sFID), the
                      weights file pt_inception-2015-12-05-6726825d.pth
    clip:DIR          a transformers CLIPModel directory (the paper: CLIP ViT-B/16)
    classifier:PATH   a small CNN trained here on a small dataset, whose penultimate layer is
                      the feature space where ImageNet features mean little
    --vq              the VQ autoencoder's encoder (vae.py) for the sample entropy (Eq. 41)

    python -m support.features train-classifier --dataset fashion-mnist --out fmnist_cls.pt

Every network takes uint8 images [B, C, H, W] and returns a dict of feature arrays [B, D].
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from support import data, system, weights

FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   + FID_WEIGHTS)


# --------------------------------------------------------------------------------------------
# The FID Inception-v3 (pytorch-fid's port of TF "inception-2015-12-05"), torchvision key names
# --------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """TF's 3x3 average pool ignores the zero padding (pytorch-fid's FID blocks)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """pool="max" in the last block (Mixed_7c): a quirk of the TF graph that pytorch-fid keeps."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """uint8 images [B, C, H, W] -> pool3 features (2048), logits (1008) and ADM's sFID features.

    Preprocessing as pytorch-fid: x / 255, bilinear resize to 299 (align_corners=False), 2x - 1.
    Grayscale is replicated to 3 channels. Load the pytorch-fid weights with `load_inception`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = images.float() / 255
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        # sFID (ADM's evaluator): TF "mixed_6/conv" = Mixed_6d.branch1x1, first 7 channels, NHWC
        # order
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(self.Mixed_6d(x)))))
        pool3 = x.mean(dim=(2, 3))
        return {"features": pool3, "logits": self.fc(pool3),
                # IS input of torch-fidelity / the original TF code
                "logits_unbiased": pool3 @ self.fc.weight.T,
                "spatial": spatial}


def load_inception(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found at '{path}'. Download "
                                f"{FID_WEIGHTS} (the pytorch-fid release asset) from "
                                f"{FID_WEIGHTS_URL}")
    model = InceptionV3()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Other feature extractors: a small domain classifier (trained here) and CLIP (local directory)
# --------------------------------------------------------------------------------------------

def to_model_input(images, channels):
    """uint8 [B, C, H, W] -> float in [-1, 1] with `channels` channels (grey <-> RGB)."""
    x = data.to_float(images)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    return x


class Classifier(nn.Module):
    """Small CNN for small grayscale datasets; its penultimate layer (128-d) is the feature
    space."""

    def __init__(self, num_classes=10, image_size=28, channels=1):
        super().__init__()
        self.image_size, self.channels = image_size, channels
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):  # float [-1, 1] at the training size
        return self.head(self.body(x))

    def embed(self, images):  # uint8 images of any size and channel count
        x = to_model_input(images, self.channels)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False)
        return {"features": self.body(x)}

    def predict(self, images):  # uint8 images -> the predicted class of each
        return self.head(self.embed(images)["features"]).argmax(1)


def load_classifier(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"classifier checkpoint not found at '{path}'; train one with: "
                                "python -m support.features train-classifier --out PATH")
    try:  # tensors and plain data only: a file that pickles code is refused, not run
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = Classifier(ckpt["num_classes"], ckpt["image_size"], ckpt["channels"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # torch raises several kinds for a foreign or damaged file
        first_line = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{path} is not a classifier of support/features.py "
                         f"({type(e).__name__}: {first_line}): train one with python -m "
                         "support.features train-classifier --out PATH") from None
    return model.eval().requires_grad_(False)


class CLIP(nn.Module):
    """transformers' CLIPModel from a local directory: image embeddings, text embeddings."""

    def __init__(self, path):
        super().__init__()
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"CLIP directory not found at '{path}'. Save one with transformers, e.g. "
                "CLIPModel/CLIPProcessor.from_pretrained('openai/clip-vit-base-patch16')"
                ".save_pretrained(DIR) (the paper: CLIP ViT-B/16)")
        from transformers import CLIPModel, CLIPProcessor
        self.model = CLIPModel.from_pretrained(path, local_files_only=True)
        self.model.eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)

    def embed_images(self, images):  # uint8 [B, C, H, W] -> [B, D] (not normalised)
        rgb = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        nhwc = list(rgb.permute(0, 2, 3, 1).cpu().numpy())
        pixels = self.processor(images=nhwc, return_tensors="pt")["pixel_values"]
        dev = self.model.visual_projection.weight.device
        pooled = self.model.vision_model(pixel_values=pixels.to(dev)).pooler_output
        return self.model.visual_projection(pooled)

    def embed_texts(self, texts):
        tok = self.processor(text=list(texts), padding=True, truncation=True, max_length=77,
                             return_tensors="pt")
        dev = self.model.text_projection.weight.device
        out = self.model.text_model(input_ids=tok["input_ids"].to(dev),
                                    attention_mask=tok["attention_mask"].to(dev))
        return self.model.text_projection(out.pooler_output)

    def embed(self, images):
        return {"features": self.embed_images(images)}


class Extractor:
    """A feature network with the name every report carries; __call__(uint8 NCHW) -> dict of [B,
    D]."""

    def __init__(self, spec, device):
        kind, _, path = spec.partition(":")
        if kind not in ("inception", "classifier", "clip") or not path:
            raise ValueError("--features must be inception:PATH, clip:DIR or classifier:PATH, got "
                             f"'{spec}'")
        if kind == "inception":
            self.net = load_inception(path)
        elif kind == "classifier":
            self.net = load_classifier(path)
        else:
            self.net = CLIP(path)
        self.kind, self.device = kind, device
        self.net.to(device)
        self.name = f"{kind}:{os.path.basename(os.path.normpath(path))}"  # in every report
        self.cache_id = f"{kind}:{os.path.abspath(path)}|{os.stat(path).st_mtime_ns}"

    @torch.no_grad()
    def __call__(self, images):
        images = images.to(self.device)  # Inception's forward gives its features and logits
        return self.net(images) if self.kind == "inception" else self.net.embed(images)


def load_vq(path, preset, device, unsafe_pickle=False):
    """The VQ autoencoder of vae.py and its codebook [K, C] (for the sample entropy)."""
    model = weights.load_autoencoder(path, preset, unsafe_pickle=unsafe_pickle)
    model = model.to(device).eval().requires_grad_(False)
    if model.config.kind != "vq":
        raise ValueError(f"'{path}' is a {model.config.kind} autoencoder; the sample entropy needs "
                         "a VQ codebook")
    return model, model.quantize.embedding.weight


def vq_latents(vq, images):
    """uint8 images -> the VQ encoder's pre-quantization latents (our reading: generated images are
    re-encoded, as the .npz holds images; for a latent model these are its decoded samples)."""
    return vq.latent(to_model_input(images, vq.config.in_channels))


# --------------------------------------------------------------------------------------------
# A domain classifier for small datasets (its penultimate layer = "classifier:PATH" features)
# --------------------------------------------------------------------------------------------

def fit_classifier(train, test, num_classes, args):
    """(Classifier trained with Adam on `train`, its accuracy on `test`); datasets of
    (float CHW image in [-1, 1], label); args: epochs, max_steps, batch_size, lr, seed."""
    torch.manual_seed(args.seed)
    x0 = train[0][0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = Classifier(num_classes, x0.shape[-1], x0.shape[0]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True)
    steps = min(args.epochs * len(loader), args.max_steps or float("inf"))
    batches = (batch for _ in range(args.epochs) for batch in loader)
    for _, (x, y) in zip(tqdm(range(steps), desc="classifier"), batches):
        loss = F.cross_entropy(model(x.to(device)), torch.as_tensor(y).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=500):
            correct += (model(x.to(device)).argmax(1).cpu() == torch.as_tensor(y)).sum().item()
    return model.cpu().requires_grad_(False), correct / len(test)


def save_classifier(path, model, accuracy, dataset):
    """The checkpoint load_classifier reads (written atomically)."""
    state = {"model": model.cpu().state_dict(), "num_classes": model.head.out_features,
             "dataset": dataset, "image_size": model.image_size, "channels": model.channels,
             "test_accuracy": accuracy}
    system.write_atomic(path, lambda tmp: torch.save(state, tmp))


def train_classifier(args):
    """Train the CNN on the dataset's train split and report its accuracy on the test split."""
    system.set_threads(args.threads)
    train, test = data.train_test_split(args.dataset, args.data_root, args.image_size,
                                        seed=args.seed)
    model, accuracy = fit_classifier(train, test, train.num_classes, args)
    save_classifier(args.out, model, accuracy, args.dataset)
    print(f"test accuracy {accuracy:.4f} ({len(test)} images); wrote {args.out}")
    return accuracy


# --------------------------------------------------------------------------------------------
# Command line (sub-commands, as vae.py)
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=system.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train-classifier", formatter_class=system.HelpFormatter,
                       help="train the small CNN whose penultimate layer is 'classifier:PATH'")
    t.add_argument("--dataset", default="fashion-mnist",
                   help="data.load_dataset name (fashion-mnist, digits, ...)")
    t.add_argument("--data-root", default=data.FASHION_MNIST_ROOT, help="dataset location")
    t.add_argument("--image-size", type=int, default=None,
                   help="as train.py's --image-size (default: native size)")
    t.add_argument("--epochs", type=int, default=3, help="passes over the training split")
    t.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (smoke runs)")
    t.add_argument("--batch-size", type=int, default=128, help="batch size")
    t.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    t.add_argument("--seed", type=int, default=0, help="seed of the initialisation and data order")
    t.add_argument("--out", required=True, help="checkpoint path to write")
    t.add_argument("--threads", type=int, default=0, help=system.THREADS_HELP)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return train_classifier(args)
    except (ValueError, FileNotFoundError) as e:  # a missing or damaged dataset: one line
        raise SystemExit(f"features.py: {e}") from None


if __name__ == "__main__":
    main()
