/*
 * A fake libnvidia-ml.so.1 that reports the simulated GPU of supervisor/sim/gpu.py.
 *
 * Build:  python -m supervisor.sim build-nvml DIR   (or: cc -shared -fPIC -O2
 *         -Wl,-soname,libnvidia-ml.so.1 -o DIR/libnvidia-ml.so.1 fake_nvml.c)
 * Use:    LD_LIBRARY_PATH=DIR SIM_GPU_STATE=/path/gpu.json  <any pynvml program>
 *
 * It exports the NVML entry points that the official bindings (nvidia-ml-py's pynvml) call
 * for device discovery, memory and per-process usage, with the same structure layouts and
 * return codes. One device, index 0. Every call re-reads the state file under a shared
 * flock, so values are as fresh as the simulator's last write.
 *
 * Like the real driver it reports PIDs as seen from the caller's PID namespace: the file
 * records each allocation's pid and the inode of its PID namespace, and a pid from another
 * namespace (a container) is translated through /proc/<n>/ns/pid and the NSpid line of
 * /proc/<n>/status when the caller can see it (host PID namespace), else reported as is.
 * Allocations whose lease lock (see gpu.py) is no longer held belong to dead processes and
 * are not reported, as a driver frees a dead process's memory.
 *
 * It never writes the state file and never blocks except on the flock.
 *
 * Fault hook (tests): when SIM_NVML_FAULT names a file that exists, every call that reads
 * the GPU fails as long as the file exists: with NVML_ERROR_GPU_IS_LOST if the file starts
 * with "lost" (the card fell off the bus), else with NVML_ERROR_UNKNOWN.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int nvmlReturn_t;
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_UNKNOWN 999
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_GPU_IS_LOST 15

#define NVML_MEMORY_V2 0x02000028u
#define NO_INSTANCE 0xFFFFFFFFu
#define LEASE_BASE_OFFSET (1LL << 30) /* gpu.py: LEASE_BASE_OFFSET */
#define MAX_ALLOCS 512
#define DEFAULT_STATE "/var/lib/vram-sim/gpu.json"
#define DEFAULT_TOTAL (24ULL << 30)

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct {
    unsigned int version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

struct nvmlDevice_st { int index; };
typedef struct nvmlDevice_st *nvmlDevice_t;

static struct nvmlDevice_st the_device = {0};
static int init_count = 0;

typedef struct { unsigned int pid; unsigned long long bytes; } proc_t;
typedef struct {
    char name[96];
    char uuid[96];
    unsigned long long total, used;
    int nprocs;
    proc_t procs[MAX_ALLOCS];
} gpu_state_t;

static const char *state_path(void) {
    const char *p = getenv("SIM_GPU_STATE");
    return (p && *p) ? p : DEFAULT_STATE;
}

static int lease_held(int fd, long long slot) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = LEASE_BASE_OFFSET + slot;
    fl.l_len = 1;
    if (fcntl(fd, F_OFD_GETLK, &fl) != 0) return 1; /* cannot tell: assume alive */
    return fl.l_type != F_UNLCK;
}

static unsigned long long own_pid_ns(void) {
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? (unsigned long long)st.st_ino : 0;
}

/* The pid, in our namespace, of the process that is `pid` inside namespace `ns`. */
static unsigned int translate_pid(unsigned int pid, unsigned long long ns) {
    if (ns == 0 || ns == own_pid_ns()) return pid;
    DIR *proc = opendir("/proc");
    if (!proc) return pid;
    struct dirent *ent;
    unsigned int found = pid;
    char path[300], line[512];
    while ((ent = readdir(proc)) != NULL) {
        if (ent->d_name[0] < '0' || ent->d_name[0] > '9') continue;
        struct stat st;
        snprintf(path, sizeof path, "/proc/%s/ns/pid", ent->d_name);
        if (stat(path, &st) != 0 || (unsigned long long)st.st_ino != ns) continue;
        snprintf(path, sizeof path, "/proc/%s/status", ent->d_name);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        while (fgets(line, sizeof line, f)) {
            if (strncmp(line, "NSpid:", 6) != 0) continue;
            char *last = strrchr(line, '\t');
            if (last && (unsigned int)strtoul(last + 1, NULL, 10) == pid)
                found = (unsigned int)strtoul(ent->d_name, NULL, 10);
            break;
        }
        fclose(f);
        if (found != pid) break;
    }
    closedir(proc);
    return found;
}

static void copy_json_string(const char *text, const char *key, char *out, size_t size) {
    const char *at = strstr(text, key);
    if (!at) return;
    at += strlen(key);
    size_t n = 0;
    while (*at && *at != '"' && n + 1 < size) {
        if (*at == '\\' && at[1]) at++;
        out[n++] = *at++;
    }
    out[n] = '\0';
}

static const char *value_after(const char *line, const char *key) {
    const char *at = strstr(line, key);
    return at ? at + strlen(key) : NULL;
}

static nvmlReturn_t injected_fault(void) {
    const char *p = getenv("SIM_NVML_FAULT");
    if (!p || !*p) return NVML_SUCCESS;
    FILE *f = fopen(p, "r");
    if (!f) return NVML_SUCCESS;
    char word[8] = {0};
    size_t n = fread(word, 1, sizeof word - 1, f);
    fclose(f);
    return (n >= 4 && strncmp(word, "lost", 4) == 0) ? NVML_ERROR_GPU_IS_LOST : NVML_ERROR_UNKNOWN;
}

static nvmlReturn_t read_state(gpu_state_t *st) {
    memset(st, 0, sizeof *st);
    nvmlReturn_t fault = injected_fault();
    if (fault != NVML_SUCCESS) return fault;
    snprintf(st->name, sizeof st->name, "NVIDIA GeForce RTX 4090 (simulated)");
    snprintf(st->uuid, sizeof st->uuid, "GPU-5151a7e0-0000-4000-8000-00000000051a");
    st->total = DEFAULT_TOTAL;
    int fd = open(state_path(), O_RDWR);
    if (fd < 0) fd = open(state_path(), O_RDONLY);
    if (fd < 0) return NVML_SUCCESS; /* no simulator has started yet: an empty GPU */
    flock(fd, LOCK_SH);
    size_t cap = 1 << 16, len = 0;
    char *text = malloc(cap + 1);
    ssize_t got;
    while (text && (got = read(fd, text + len, cap - len)) > 0) {
        len += (size_t)got;
        if (len == cap) {
            char *bigger = realloc(text, 2 * cap + 1);
            if (!bigger) { free(text); text = NULL; break; }
            text = bigger;
            cap *= 2;
        }
    }
    if (!text) { close(fd); return NVML_ERROR_UNKNOWN; }
    text[len] = '\0';
    copy_json_string(text, "\n\"name\": \"", st->name, sizeof st->name);
    copy_json_string(text, "\n\"uuid\": \"", st->uuid, sizeof st->uuid);
    const char *total = value_after(text, "\n\"total_bytes\": ");
    if (total) st->total = strtoull(total, NULL, 10);
    for (char *line = strstr(text, "\n{\"owner\": "); line; line = strstr(line + 1, "\n{\"owner\": ")) {
        char *end = strchr(line + 1, '\n');
        if (end) *end = '\0';
        const char *pid = value_after(line, "\"pid\": ");
        const char *ns = value_after(line, "\"pid_ns\": ");
        const char *lease = value_after(line, "\"lease\": ");
        const char *bytes = value_after(line, "\"bytes\": ");
        if (pid && bytes && !(lease && *lease != 'n' && !lease_held(fd, strtoll(lease, NULL, 10)))) {
            unsigned long long b = strtoull(bytes, NULL, 10);
            unsigned int p = translate_pid((unsigned int)strtoul(pid, NULL, 10),
                                           (ns && *ns != 'n') ? strtoull(ns, NULL, 10) : 0);
            st->used += b;
            int i = 0;
            while (i < st->nprocs && st->procs[i].pid != p) i++;
            if (i < MAX_ALLOCS) {
                if (i == st->nprocs) { st->procs[i].pid = p; st->procs[i].bytes = 0; st->nprocs++; }
                st->procs[i].bytes += b;
            }
        }
        if (end) *end = '\n';
    }
    free(text);
    close(fd);
    if (st->used > st->total) st->used = st->total;
    return NVML_SUCCESS;
}

#define REQUIRE_INIT() do { if (init_count <= 0) return NVML_ERROR_UNINITIALIZED; } while (0)
#define REQUIRE_DEVICE(d) do { REQUIRE_INIT(); if ((d) != &the_device) return NVML_ERROR_INVALID_ARGUMENT; } while (0)

static nvmlReturn_t copy_out(const char *value, char *out, unsigned int length) {
    if (!out) return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    strcpy(out, value);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------------ library */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; init_count++; return NVML_SUCCESS; }
nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    REQUIRE_INIT();
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    REQUIRE_INIT();
    return copy_out("560.35.03", version, length);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    REQUIRE_INIT();
    return copy_out("12.560.35.03", version, length);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *version) {
    if (!version) return NVML_ERROR_INVALID_ARGUMENT;
    *version = 12060;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

/* ------------------------------------------------------------------ devices */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    REQUIRE_INIT();
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = 1;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    REQUIRE_INIT();
    if (!device || index != 0) return NVML_ERROR_INVALID_ARGUMENT;
    *device = &the_device;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    REQUIRE_INIT();
    if (!uuid || !device) return NVML_ERROR_INVALID_ARGUMENT;
    gpu_state_t st;
    nvmlReturn_t rc = read_state(&st);
    if (rc != NVML_SUCCESS) return rc;
    if (strcmp(uuid, st.uuid) != 0) return NVML_ERROR_NOT_FOUND;
    *device = &the_device;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index) {
    REQUIRE_DEVICE(device);
    if (!index) return NVML_ERROR_INVALID_ARGUMENT;
    *index = 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    REQUIRE_DEVICE(device);
    gpu_state_t st;
    nvmlReturn_t rc = read_state(&st);
    return rc != NVML_SUCCESS ? rc : copy_out(st.name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    REQUIRE_DEVICE(device);
    gpu_state_t st;
    nvmlReturn_t rc = read_state(&st);
    return rc != NVML_SUCCESS ? rc : copy_out(st.uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    REQUIRE_DEVICE(device);
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    gpu_state_t st;
    nvmlReturn_t rc = read_state(&st);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = st.total;
    memory->used = st.used;
    memory->free = st.total - st.used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    REQUIRE_DEVICE(device);
    if (!memory) return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != NVML_MEMORY_V2) return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    gpu_state_t st;
    nvmlReturn_t rc = read_state(&st);
    if (rc != NVML_SUCCESS) return rc;
    memory->total = st.total;
    memory->reserved = 0;
    memory->used = st.used;
    memory->free = st.total - st.used;
    return NVML_SUCCESS;
}

/* NVML's two-call protocol: too small a buffer (or none) gets INSUFFICIENT_SIZE and the
 * count needed; an empty list is SUCCESS with count 0. */
static nvmlReturn_t list_processes(nvmlDevice_t device, unsigned int *count, void *infos, int v1) {
    REQUIRE_DEVICE(device);
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    gpu_state_t st;
    nvmlReturn_t rc = read_state(&st);
    if (rc != NVML_SUCCESS) return rc;
    unsigned int n = (unsigned int)st.nprocs;
    if (n == 0) { *count = 0; return NVML_SUCCESS; }
    if (!infos || *count < n) { *count = n; return NVML_ERROR_INSUFFICIENT_SIZE; }
    for (unsigned int i = 0; i < n; i++) {
        if (v1) {
            nvmlProcessInfo_v1_t *out = (nvmlProcessInfo_v1_t *)infos + i;
            out->pid = st.procs[i].pid;
            out->usedGpuMemory = st.procs[i].bytes;
        } else {
            nvmlProcessInfo_t *out = (nvmlProcessInfo_t *)infos + i;
            out->pid = st.procs[i].pid;
            out->usedGpuMemory = st.procs[i].bytes;
            out->gpuInstanceId = NO_INSTANCE;
            out->computeInstanceId = NO_INSTANCE;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *i) {
    return list_processes(d, c, i, 0);
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *i) {
    return list_processes(d, c, i, 0);
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_v1_t *i) {
    return list_processes(d, c, i, 1);
}

/* The simulated GPU runs compute work only: no graphics processes. */
static nvmlReturn_t no_processes(nvmlDevice_t device, unsigned int *count) {
    REQUIRE_DEVICE(device);
    if (!count) return NVML_ERROR_INVALID_ARGUMENT;
    *count = 0;
    return NVML_SUCCESS;
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, void *i) {
    (void)i;
    return no_processes(d, c);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, void *i) {
    (void)i;
    return no_processes(d, c);
}
nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses(nvmlDevice_t d, unsigned int *c, void *i) {
    (void)i;
    return no_processes(d, c);
}
