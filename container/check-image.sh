#!/bin/bash
# Runs the image's own entrypoint without a container runtime (this machine's cgroups refuse one): a
# container is created (not started), its file system mounted, and the entrypoint run in a chroot of it
# as the image's user.  Checks: nothing of ours in the state volume before the first start (no secret, no
# patient data), check-config on the shipped configuration, the default command's daemon starting on it
# (run --once: the site secret and linkage key made on the volume), and the demo end to end.
set -euo pipefail
IMAGE=${1:-localhost/medsendx-edge:latest}
ctr=$(podman create "$IMAGE")
mnt=$(podman mount "$ctr")
cleanup() { podman umount "$ctr" >/dev/null 2>&1 || true; podman rm -f "$ctr" >/dev/null 2>&1 || true; }
trap cleanup EXIT

user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
uid=$(chroot "$mnt" id -u "$user"); gid=$(chroot "$mnt" id -g "$user")
mapfile -t entry < <(podman image inspect --format '{{range .Config.Entrypoint}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
mapfile -t cmd < <(podman image inspect --format '{{range .Config.Cmd}}{{println .}}{{end}}' "$IMAGE" | sed '/^$/d')
path=$(podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$IMAGE" | sed -n 's/^PATH=//p')
in_image() {  # the entrypoint with these arguments, as the image's user, in its working directory
  chroot --userspec="$uid:$gid" "$mnt" /usr/bin/env -i PATH="$path" HOME=/var/lib/medsendx-edge \
    PYTHONDONTWRITEBYTECODE=1 TINI_SUBREAPER=1 sh -c 'cd /var/lib/medsendx-edge && exec "$@"' sh "${entry[@]}" "$@"
}

echo "image: $IMAGE, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'), user $user ($uid:$gid)"
echo "entrypoint: ${entry[*]}; command: ${cmd[*]}"
leftovers=$(find "$mnt/var/lib/medsendx-edge" "$mnt/etc/medsendx-edge" -type f ! -name medsendx-edge.yaml | head -5)
keys=$(find "$mnt" -xdev \( -name '*.key' -o -name 'linkage.db' -o -name '*.dcm' \) -not -path '*/site-packages/*' | head -5)
if [ -n "$leftovers$keys" ]; then echo "FAIL: the image holds state, secrets or images: $leftovers $keys"; exit 1; fi
echo "ok: no secret, no state, no image in the image"

in_image check-config /etc/medsendx-edge/medsendx-edge.yaml
# the compose set-up's configuration, against the image (its inbox volume mounted there)
install -d -o "$uid" -g "$gid" "$mnt/srv/medsendx/inbox"
install -m 0644 "$(dirname "$0")/compose-medsendx-edge.yaml" "$mnt/tmp/compose-medsendx-edge.yaml"
in_image check-config /tmp/compose-medsendx-edge.yaml
logs=$(in_image "${cmd[@]}" --once)
grep -q '"event": "spool_recovered"' <<<"$logs" || { echo "FAIL: no JSON log line on stdout"; exit 1; }
for f in site-secret.key linkage.key; do
  test -s "$mnt/var/lib/medsendx-edge/secrets/$f" || { echo "FAIL: the first start made no $f"; exit 1; }
done
mode=$(stat -c %a "$mnt/var/lib/medsendx-edge/secrets/site-secret.key")
[ "$mode" = 600 ] || [ "$mode" = 400 ] || { echo "FAIL: the site secret is mode $mode"; exit 1; }
echo "ok: the default command started and stopped, logging JSON on stdout; the secrets made on the volume (mode $mode)"
in_image status --config /etc/medsendx-edge/medsendx-edge.yaml >/dev/null && echo "ok: status (the HEALTHCHECK) exits 0"
demo=$(in_image demo --workdir /var/lib/medsendx-edge/demo | tail -3)
echo "$demo"
grep -q " delivered to " <<<"$demo" || { echo "FAIL: the demo delivered nothing"; exit 1; }
echo "ok: the demo ran end to end inside the image"
