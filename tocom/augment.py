"""DeiT-III's 3-Augment (`--ThreeAugment`): a random crop, a horizontal flip, one of grayscale / solarization /
Gaussian blur, colour jitter. (Generic DeiT machinery: a candidate for shared/.)"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms


def three_augment_transform(args):
    size = args.input_size
    if getattr(args, 'src', False):  # "simple random crop": resize then crop with reflection padding
        crop = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomCrop(size, padding=4, padding_mode='reflect')]
    else:
        crop = [RandomResizedCropAndInterpolation(size, scale=(0.08, 1.0), interpolation='bicubic')]
    one_of = transforms.RandomChoice([transforms.RandomGrayscale(p=1.0),
                                      transforms.RandomSolarize(threshold=128, p=1.0),
                                      transforms.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))])
    tail = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    jitter = [transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter)] \
        if args.color_jitter else []
    return transforms.Compose(crop + [transforms.RandomHorizontalFlip(), one_of] + jitter + tail)
