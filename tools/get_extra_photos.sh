#!/usr/bin/env bash
# More training photographs: the photographic wallpapers of Debian's lomiri-wallpapers-16.04 and
# -20.04 packages (15 photos, 1080p to 4K), unpacked under OUT_DIR without installing them.
# Installing would put them in /usr/share/backgrounds, where ../shared/datasets/get-photos.sh would
# pick them up and shift its train/validation split; unpacked here, the validation set stays as is.
# Usage: bash tools/get_extra_photos.sh [PHOTOS_DIR] [OUT_DIR]   (defaults: data/photos, data/extra-photos)
# Writes PHOTOS_DIR/train-plus.txt: PHOTOS_DIR/train.txt followed by the extra photos.
set -euo pipefail
photos="${1:-data/photos}"
out="${2:-data/extra-photos}"
[ -f "$photos/train.txt" ] || { echo "no $photos/train.txt: run ../shared/datasets/get-photos.sh $photos first" >&2; exit 1; }
mkdir -p "$out/debs"
out="$(cd "$out" && pwd)"
(cd "$out/debs" && apt-get download lomiri-wallpapers-16.04 lomiri-wallpapers-20.04 >/dev/null)
for deb in "$out"/debs/*.deb; do dpkg-deb -x "$deb" "$out/root"; done
# Digital art and flat colour left out (Fossa, Infinite-Sea, Painting-Colors, umang).
keep="Bridge Dragonfly Kleiber Picture_0B Picture_1A Wine aitzgorri analogpattern free friends greentock life picosdeeuropa seeding sunset"
cp "$photos/train.txt" "$photos/train-plus.txt"
n=0
for name in $keep; do
  f=$(ls "$out"/root/usr/share/backgrounds/"${name}"_by_*.jpg)
  echo "$f" >> "$photos/train-plus.txt"
  n=$((n + 1))
done
echo "$n extra photos; $(wc -l < "$photos/train-plus.txt") training photos listed in $photos/train-plus.txt"
