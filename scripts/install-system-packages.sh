#!/bin/sh
# Installs the optional system packages modalign uses, when it can (root and apt-get present).
# Missing ones only switch off a style or modality: the build says which and carries on.
PKGS="fonts-noto-color-emoji espeak-ng unicode-data chromium chromium-driver"
missing=""
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing="$missing fonts-noto-color-emoji"
command -v espeak-ng >/dev/null 2>&1 || missing="$missing espeak-ng"
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || missing="$missing unicode-data"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "modalign: installing system packages:$missing"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing) >/dev/null 2>&1 \
    || echo "modalign: apt-get could not install some of:$missing (carrying on without them)"
else
  echo "modalign: not root or no apt-get; missing optional system packages:$missing"
  echo "modalign: without them the Noto style, speech, Unicode groups or the browser tests are skipped."
fi
exit 0
