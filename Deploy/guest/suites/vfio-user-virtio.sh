# vfio-user-virtio: the VfioUserVirtio transport (virtio-blk and virtio-scsi device models as modern virtio-pci
# functions over vfio-user) under sid's QEMU 11 `vfio-user-pci` with the guest's own virtio_pci + virtio_blk /
# virtio_scsi drivers (MSI-X). Until the gateway wires the transport, the function is served by the env-gated
# unit test `RealQEMUServeTests` (Tests/VfioUserVirtioTests) on an in-memory 64 MiB disk: fio randwrite+verify
# (8 MiB, 4 KiB, QD16) on /dev/vda and /dev/sda; the server checks that the guest's I/O went through it.
REGISTERED_SUITES+=(vfio-user-virtio)

suite_vfio_user_virtio() {
    DIR="$WORK/vfuvirtio"; mkdir -p "$DIR"
    local kind disk sock spid rc
    for kind in blk scsi; do
        disk=vda; [ "$kind" = scsi ] && disk=sda
        sock="$DIR/$kind.sock"
        SCSIGATE_VFU_KIND=$kind SCSIGATE_VFU_SERVE_SOCKET=$sock SCSIGATE_VFU_SERVE_SECONDS=400 \
            swift test --skip-build --filter RealQEMUServeTests > "$DIR/$kind-server.log" 2>&1 &
        spid=$!
        for _ in $(seq 1 120); do [ -S "$sock" ] && break; sleep 0.5; done
        guest_run --sid --quiet --test fio-verify --log "$DIR/$kind-guest.log" --timeout 400 \
            --append "scsigate.size=8M scsigate.bs=4k scsigate.disk=$disk" \
            -- -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$sock\",\"type\":\"unix\"}}"
        rc=$?
        check "vfio-user virtio-$kind (QEMU 11 vfio-user-pci, Linux virtio_$kind): fio verify on /dev/$disk" $rc
        wait $spid
        check "vfio-user virtio-$kind: the guest's I/O went through the function (server test)" $?
        grep -a 'guest I/O\|MSI-X' "$DIR/$kind-server.log" | cut -c1-160 | sed "s/^/[vfio-user-virtio $kind] /"
        grep -a 'fio 4k' "$DIR/$kind-guest.log" | tr -d '\r' | sed "s/^/[vfio-user-virtio $kind] /"
    done
}
