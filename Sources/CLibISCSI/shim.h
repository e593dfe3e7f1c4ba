#ifndef SCSIGATE_CLIBISCSI_SHIM_H
#define SCSIGATE_CLIBISCSI_SHIM_H
/* libiscsi (libiscsi-dev): the asynchronous iSCSI initiator API and its SCSI helpers.
 * (timerfd(2), which Swift's Glibc module does not export, comes from CSystem.) */
#include <stdint.h>
#include <stddef.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
#endif
