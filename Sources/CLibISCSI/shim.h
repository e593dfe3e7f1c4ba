#ifndef SCSIGATE_CLIBISCSI_SHIM_H
#define SCSIGATE_CLIBISCSI_SHIM_H
/* libiscsi (libiscsi-dev): the asynchronous iSCSI initiator API and its SCSI helpers.
 * Also timerfd(2), which Swift's Glibc module does not export: each iSCSI channel owns one
 * for its reconnect backoff and request deadlines. */
#include <stdint.h>
#include <stddef.h>
#include <sys/timerfd.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
#endif
